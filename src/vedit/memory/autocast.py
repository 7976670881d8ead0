"""CUDA's autocast and attention kernels, applied to a trace that runs on no GPU.

Under CUDA autocast the GroupNorms, LayerNorms, upsampling and losses run in fp32 and the
matmuls and convolutions cast their inputs to fp16/bf16, so which tensors are fp32 depends on
it: a trace without it misses a quarter of a training step's peak. A CPU build of PyTorch
cannot run CUDA's autocast kernels, and CPU autocast has other op lists, so `CudaFunctions` (a
`TorchFunctionMode`, above autograd as autocast is) applies CUDA's cast policy itself: the op
lists of PyTorch's `aten/src/ATen/autocast_mode.h` (lower precision, fp32, fp32 output,
promote), with autocast's cache of the casts of trained fp32 weights within a region.

It also routes `scaled_dot_product_attention` to the fused kernel's op a GPU would run (flash,
cuDNN or memory-efficient, chosen by `gpu.attention_backend`), so the trace holds what that
kernel saves for backward instead of the math path's attention matrix.

Gradient checkpointing replays blocks during backward, where no torch-function mode is active
(the mode steps aside while it handles `backward`): `replaying_checkpoint` wraps each
checkpointed function so that its replay runs under this mode, with the autocast state its
forward had, as torch.utils.checkpoint restores real autocast.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from vedit.memory.gpu import CUDNN, EFFICIENT, FLASH, Gpu, attention_backend

_LOWER_PRECISION = frozenset({
    "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "_convolution", "prelu", "addmm", "addmv", "addr",
    "matmul", "__matmul__", "__rmatmul__", "einsum", "mm", "mv", "linalg_vecdot", "linear",
    "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "lstm_cell", "gru_cell",
    "rnn_tanh_cell", "rnn_relu_cell", "scaled_dot_product_attention",
})
_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "__rpow__", "softplus", "layer_norm",
    "group_norm", "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
})
#: Ops with an output dtype argument: autocast asks for fp32 output, the input is not cast.
_FP32_OUTPUT = frozenset({
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "sum", "norm",
})
_PROMOTE = frozenset({
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sample",
    "index_put", "tensordot", "scatter_add",
})
#: `F.interpolate` modes whose upsampling kernel is in autocast's fp32 list.
_FP32_INTERPOLATION = frozenset({"nearest", "nearest-exact", "linear", "bilinear", "bicubic",
                                 "trilinear"})


@dataclass(frozen=True)
class AutocastState:
    """One autocast region's settings, as `torch.autocast("cuda", dtype)` takes them."""

    enabled: bool = False
    dtype: torch.dtype = torch.float16
    cache_enabled: bool = True


class _Autocast:
    """The emulated autocast's thread of state: the active region, nesting and the cast cache."""

    def __init__(self) -> None:
        self.state = AutocastState()
        self.nesting = 0
        self.cache: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}

    @contextlib.contextmanager
    def region(self, state: AutocastState) -> Iterator[None]:
        previous, self.state = self.state, state
        self.nesting += 1
        try:
            yield
        finally:
            self.nesting -= 1
            if self.nesting == 0:
                self.cache.clear()
            self.state = previous

    def cast(self, value: Any, dtype: torch.dtype) -> Any:
        """`value` with its eligible tensors cast to `dtype`, as autocast's `cached_cast`."""
        if isinstance(value, (list, tuple)):
            return type(value)(self.cast(item, dtype) for item in value)
        if not _eligible(value) or value.dtype == dtype:
            return value
        cacheable = (self.state.cache_enabled and dtype == self.state.dtype
                     and value.dtype == torch.float32 and value.requires_grad and value.is_leaf
                     and not value._is_view())
        if not cacheable:
            return value.to(dtype)
        hit = self.cache.get(id(value))
        if hit is not None and hit[0]() is value:
            return hit[1]
        cast = value.to(dtype)
        self.cache[id(value)] = (weakref.ref(value), cast)
        return cast


def _eligible(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.dtype != torch.float64)


def _widest(args: Any, lower: torch.dtype) -> torch.dtype:
    flat = [a for a in _flatten(args) if _eligible(a)]
    return torch.float32 if any(a.dtype == torch.float32 for a in flat) else lower


def _flatten(values: Any) -> Iterator[Any]:
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _flatten(value)
        else:
            yield value


class CudaFunctions(TorchFunctionMode):
    """Applies CUDA autocast's cast policy inside `autocast` regions and routes attention to the
    fused kernel `gpu` would run (see the module docstring)."""

    def __init__(self, gpu: Gpu) -> None:
        super().__init__()
        self.gpu = gpu
        self.autocast = _Autocast()

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        state = self.autocast.state
        if state.enabled:
            args, kwargs = self._autocast(name, args, kwargs, state.dtype)
        if name == "scaled_dot_product_attention":
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _autocast(self, name: str, args: Any, kwargs: dict[str, Any], lower: torch.dtype
                  ) -> tuple[Any, dict[str, Any]]:
        cast = self.autocast.cast
        if name in _LOWER_PRECISION:
            return cast(args, lower), {k: cast(v, lower) for k, v in kwargs.items()}
        if name in _FP32 or (name == "interpolate"
                             and kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
                             in _FP32_INTERPOLATION):
            return cast(args, torch.float32), {k: cast(v, torch.float32)
                                               for k, v in kwargs.items()}
        if name in _FP32_OUTPUT and args and _eligible(args[0]) and kwargs.get("dtype") is None:
            return args, kwargs | {"dtype": torch.float32}
        if name in _PROMOTE:
            widest = _widest([args, list(kwargs.values())], lower)
            return cast(args, widest), {k: cast(v, widest) for k, v in kwargs.items()}
        return args, kwargs

    def _attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> torch.Tensor:
        """SDPA as the fused kernel the GPU would pick, with what it saves for backward."""
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (query, key, value))
        backend = attention_backend(self.gpu, query, key, attn_mask, needs_grad)
        aten = torch.ops.aten
        outputs: tuple[torch.Tensor, ...]
        if backend == FLASH:
            outputs = aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)
        elif backend == CUDNN:
            outputs = aten._scaled_dot_product_cudnn_attention(
                query, key, value, attn_mask, needs_grad, dropout_p, is_causal, False,
                scale=scale)
        elif backend == EFFICIENT:
            outputs = aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale)
        else:
            outputs = aten._scaled_dot_product_attention_math(
                query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                enable_gqa=enable_gqa)
        return outputs[0]

    def active(self) -> bool:
        return any(mode is self for mode in _get_current_function_mode_stack())

    @contextlib.contextmanager
    def region(self, state: AutocastState) -> Iterator[None]:
        """Run under this mode (entering it if a backward pass left it) with autocast `state`."""
        with (contextlib.nullcontext() if self.active() else self), self.autocast.region(state):
            yield

    def replaying_checkpoint(self, checkpoint: Callable[..., Any]) -> Callable[..., Any]:
        """`checkpoint` whose replay during backward runs under this mode, with the autocast
        state of its forward."""

        def patched(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            state = self.autocast.state

            def replayable(*inner: Any, **inner_kwargs: Any) -> Any:
                with self.region(state):
                    return function(*inner, **inner_kwargs)

            return checkpoint(replayable, *args, **kwargs)

        return patched


def autocast_forward(functions: CudaFunctions, forward: Callable[..., Any],
                     dtype: torch.dtype) -> Callable[..., Any]:
    """`forward` under CUDA autocast to `dtype`, its floating outputs returned in fp32: what
    accelerate's `prepare` makes of a model's forward under mixed precision."""
    from accelerate.utils import convert_outputs_to_fp32

    def autocast(*args: Any, **kwargs: Any) -> Any:
        with functions.region(AutocastState(True, dtype)):
            return forward(*args, **kwargs)

    wrapped: Callable[..., Any] = convert_outputs_to_fp32(autocast)
    return wrapped

