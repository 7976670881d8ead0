"""The target GPU, and the memory its kernels take that a trace of tensors cannot see.

A trace sees every tensor an op returns. On a GPU some kernels also take scratch memory from the
caching allocator for the length of the call, and a few libraries keep their own buffers; those
are added here, each from the kernel's own sizing rule where it is known, or modelled:

- attention: which fused kernel `scaled_dot_product_attention` picks (its rules in PyTorch's
  `sdp_utils.cpp`: cuDNN first on Hopper and Blackwell for head dims up to 128, flash attention
  for fp16/bf16 head dims up to 256 from Ampere on, memory-efficient attention otherwise), and
  the scratch its backward takes: flash attention's fp32 `dq_accum` with the query length
  padded to 128 and the head dim to 32 (FlashAttention-2's `mha_bwd`), memory-efficient
  attention's fp32 gradient accumulator for half inputs, and for cuDNN a modelled fp32 dQ
  accumulator of the query's size;
- convolutions: cuDNN's workspace, modelled as `CONV_WORKSPACE` times the bytes of the
  convolution's input and output, for the length of each forward and backward call (the one
  fitted constant, calibrated on issue 10's H100 figures; README "Memory");
- cuBLAS: one workspace per handle, which PyTorch takes from the caching allocator and keeps;
  one handle serves the forward (the calling thread), one the backward (autograd's thread).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

GIB = 2**30
MIB = 2**20
#: cuDNN convolution workspace per byte of the convolution's input plus output (fitted).
CONV_WORKSPACE = 2.0
#: What the CUDA context, cuBLAS and cuDNN take outside PyTorch's allocator (not in its stats).
CONTEXT_BYTES = 512 * MIB
#: The compute capability assumed when only the memory of a GPU is known: an Ampere/Ada card,
#: whose flash attention backward takes more scratch than Hopper's cuDNN attention.
DEFAULT_CAPABILITY = (8, 6)

FLASH, CUDNN, EFFICIENT, MATH = "flash", "cudnn", "efficient", "math"
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Gpu:
    """A GPU to predict for: its name, its memory in bytes and its compute capability."""

    name: str
    total_bytes: int | None
    capability: tuple[int, int] = DEFAULT_CAPABILITY
    capability_known: bool = True

    @property
    def bf16(self) -> bool:
        """Whether it runs bf16 natively (Ampere on): vedit's `auto` precision picks it then."""
        return self.capability >= (8, 0)

    @property
    def usable_bytes(self) -> int | None:
        """What PyTorch's allocator can get: the memory less the CUDA context."""
        return None if self.total_bytes is None else self.total_bytes - CONTEXT_BYTES

    @property
    def cublas_workspace_bytes(self) -> int:
        """PyTorch's default cuBLAS workspace: 32 MiB from Hopper on, else 4096 KiB x 2 +
        16 KiB x 8 (`CUBLAS_WORKSPACE_CONFIG` overrides both)."""
        config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        if config:  # ":SIZE_KIB:COUNT" pairs, e.g. ":4096:8"
            numbers = [int(part) for part in config.split(":") if part]
            return sum(kib * 1024 * count for kib, count in zip(numbers[::2], numbers[1::2],
                                                             strict=True))
        if self.capability >= (9, 0):
            return 32 * MIB
        return 4096 * 1024 * 2 + 16 * 1024 * 8

    def describe(self) -> str:
        major, minor = self.capability
        kernels = (f"compute capability {major}.{minor}" if self.capability_known
                   else f"kernels as on compute capability {major}.{minor}")
        return f"{self.name} ({kernels})"


def gpu_with_memory(gigabytes: float) -> Gpu:
    """A GPU known only by its memory (`--gpu-memory GB`)."""
    return Gpu(f"a {gigabytes:g} GB GPU", int(gigabytes * GIB), capability_known=False)


def target_gpu(gigabytes: float | None = None) -> Gpu:
    """The GPU to predict for: one of `gigabytes`, else this machine's, else one whose memory
    is unknown (a prediction then says nothing of fitting)."""
    if gigabytes is not None:
        return gpu_with_memory(gigabytes)
    return current_gpu() or Gpu("a GPU of unknown memory", None, capability_known=False)


def measured_peak_gb(device: torch.device) -> float | None:
    """The peak GPU memory this process has allocated on `device` (None off a GPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2)


def current_gpu() -> Gpu | None:
    """This machine's first CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return Gpu(f"{props.name} ({props.total_memory / GIB:.0f} GB)", props.total_memory,
               (props.major, props.minor))


def attention_backend(gpu: Gpu, query: torch.Tensor, key: torch.Tensor,
                      attn_mask: torch.Tensor | None, training: bool) -> str:
    """The kernel PyTorch's SDPA runs for these inputs on `gpu` (`sdp_utils.cpp`, default
    priority order)."""
    head_dim = query.shape[-1]
    half = query.dtype in _HALF
    major, minor = gpu.capability
    if (half and attn_mask is None and major in (9, 10) and head_dim <= 128 and head_dim % 8 == 0
            and query.shape[-2] > 1 and key.shape[-2] > 1):
        return CUDNN
    flash_dims = 192 if training and (major, minor) in ((8, 6), (8, 9)) else 256
    if half and attn_mask is None and major >= 8 and head_dim <= flash_dims:
        return FLASH
    if major >= 5:
        return EFFICIENT
    return MATH


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def attention_backward_scratch(backend: str, query: torch.Tensor) -> int:
    """Bytes an attention backward takes for the length of the call, beyond its gradients."""
    batch, heads, length, head_dim = query.shape
    if backend == FLASH:
        rounded_dim = _round_up(head_dim, 32) if head_dim <= 192 else 256
        rounded_length = _round_up(length, 128)
        return 4 * batch * heads * rounded_length * (rounded_dim + 1)  # dq_accum, softmax_d
    if backend in (CUDNN, EFFICIENT) and (backend == CUDNN or query.dtype in _HALF):
        return 4 * batch * heads * length * head_dim
    return 0


def conv_workspace(input_bytes: int, output_bytes: int) -> int:
    """cuDNN's workspace for one convolution call (modelled, see `CONV_WORKSPACE`)."""
    return math.ceil(CONV_WORKSPACE * (input_bytes + output_bytes))
