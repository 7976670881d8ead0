"""Trace a computation's GPU memory on tensors that have shapes but no data.

`simulated_gpu` runs ordinary PyTorch code (vedit's own training step, sampler and decoder)
under a `FakeTensorMode`: every tensor is a fake on the CPU device standing for one on the GPU,
so the step of a 1-billion-parameter model traces in seconds in little memory. A
`TorchDispatchMode` below autograd records each storage when an op creates it and, through a
weakref finalizer, when the last reference to it goes, so the trace holds the allocations and
frees in the order the GPU would see them (autograd's own saving and freeing included).
`CudaFunctions` (autocast.py) gives the ops CUDA's autocast dtypes and attention kernels; the
kernel scratch the trace cannot see is added where the kernels run (gpu.py); the caching
allocator turns the events into the peaks PyTorch reports (allocator.py).

What a trace cannot know is data: a read of a value (`.item()`, `bool(tensor)`) answers 1, or
False for booleans, which no code vedit traces branches on for memory.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConverter, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vedit.memory.allocator import Event, Replay, replay
from vedit.memory.autocast import CudaFunctions
from vedit.memory.gpu import (
    CUDNN,
    EFFICIENT,
    FLASH,
    Gpu,
    attention_backward_scratch,
    conv_workspace,
)

aten = torch.ops.aten
_ATTENTION_BACKWARD = {
    aten._scaled_dot_product_flash_attention_backward.default: FLASH,
    aten._scaled_dot_product_cudnn_attention_backward.default: CUDNN,
    aten._scaled_dot_product_efficient_attention_backward.default: EFFICIENT,
}
_MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
            aten.addmv.default, aten.mv.default, aten.addbmm.default,
            aten._addmm_activation.default}


@dataclass
class Trace:
    """The allocation events of a traced computation, with the named sections they fell in."""

    events: list[Event] = field(default_factory=list)
    sections: list[tuple[int, str]] = field(default_factory=lambda: [(0, "start")])
    _keys: Iterator[int] = field(default_factory=itertools.count)

    def alloc(self, nbytes: int) -> int:
        key = next(self._keys)
        self.events.append(("alloc", key, nbytes))
        return key

    def free(self, key: int) -> None:
        self.events.append(("free", key, 0))

    def transient(self, nbytes: int) -> None:
        """Scratch a kernel holds for the length of its call."""
        if nbytes > 0:
            self.free(self.alloc(nbytes))

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Name the events of the block (the peak is reported with its section's name)."""
        outer = self.sections[-1][1]
        self.sections.append((len(self.events), name))
        try:
            yield
        finally:
            self.sections.append((len(self.events), outer))

    def section_at(self, index: int) -> str:
        """The name of the section that event `index` fell in."""
        name = self.sections[0][1]
        for start, section in self.sections:
            if start > index:
                break
            name = section
        return name

    def replay(self, capacity: int | None = None) -> Replay:
        return replay(self.events, capacity)


class _StorageTracker(TorchDispatchMode):
    """Records the storages ops create and their end; adds the kernels' scratch and answers
    reads of values."""

    def __init__(self, trace: Trace, gpu: Gpu) -> None:
        TorchDispatchMode.__init__(self)  # named: mypy's untyped_calls_exclude misses super()
        self.trace = trace
        self.gpu = gpu
        self.live: dict[int, int] = {}  # the storage's C pointer -> its trace key
        self.recording = True
        self.pending: list[weakref.ref[torch.UntypedStorage]] = []
        self.cublas_handles: set[bool] = set()  # forward (False) and backward (True) threads

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 1
        out = func(*args, **kwargs)
        with torch._C.DisableTorchFunction():  # plain bookkeeping: no autocast or routing
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self.created(tensor.untyped_storage())
            if self.recording:
                self._kernel_scratch(func, args, out)
        return out

    def created(self, storage: torch.UntypedStorage) -> None:
        """Count a storage an op returned from now until it is freed (once per storage); while
        not recording, keep it to count when recording starts, if it is still alive then."""
        if not self.recording:
            self.pending.append(weakref.ref(storage))
            return
        pointer = storage._cdata
        if pointer in self.live or storage.nbytes() == 0:
            return
        key = self.trace.alloc(storage.nbytes())
        self.live[pointer] = key
        weakref.finalize(storage, self._freed, pointer, key)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.recording, self.pending = False, []
        try:
            yield
        finally:
            self.recording = True
            for ref in self.pending:
                storage = ref()
                if storage is not None:
                    self.created(storage)
            self.pending = []

    def _freed(self, pointer: int, key: int) -> None:
        if self.live.get(pointer) == key:
            del self.live[pointer]
        self.trace.free(key)

    def _kernel_scratch(self, func: Any, args: Any, out: Any) -> None:
        if func is aten.convolution.default:  # (input, weight, ...) -> output
            self.trace.transient(conv_workspace(_nbytes(args[0]), _nbytes(out)))
        elif func is aten.convolution_backward.default:  # (grad_output, input, weight, ...)
            self.trace.transient(conv_workspace(_nbytes(args[1]), _nbytes(args[0])))
        elif func in _ATTENTION_BACKWARD:
            self.trace.transient(attention_backward_scratch(_ATTENTION_BACKWARD[func], args[1]))
        elif func in _MATMULS:
            backward = torch._C._current_graph_task_id() != -1
            if backward not in self.cublas_handles:
                self.cublas_handles.add(backward)
                self.trace.alloc(self.gpu.cublas_workspace_bytes)  # kept for good


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class Simulation:
    """A simulated GPU being traced: build models and run steps inside `simulated_gpu`."""

    gpu: Gpu
    trace: Trace
    functions: CudaFunctions
    tracker: _StorageTracker
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def untraced(self) -> contextlib.AbstractContextManager[None]:
        """Run the block unrecorded, then count what it made and kept as allocated at its end:
        building models, which a real run loads straight in their dtype where building casts
        them from fp32."""
        return self.tracker.paused()

    def accelerator(self, mixed_precision: str, gradient_accumulation_steps: int = 1) -> Any:
        """accelerate's `Accelerator` as it behaves on one GPU, for traced training steps."""
        from vedit.memory.accelerator import SimulatedAccelerator

        return SimulatedAccelerator(self, mixed_precision, gradient_accumulation_steps)


class _FreshOutputs(FakeTensorConverter):
    """FakeTensorMode's converter, without its memo of op outputs (which are fresh): the memo's
    weak references make `Module.to()`, which swaps fake parameters in place, refuse them."""

    def from_meta_and_device(self, fake_mode: FakeTensorMode, t: torch.Tensor,
                             device: torch.device, pytype: Any = None,
                             dispatch_keys: Any = None) -> FakeTensor:
        return FakeTensor(fake_mode, t, device, pytype=pytype, dispatch_keys=dispatch_keys)


def _fake_mode() -> FakeTensorMode:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.fake_tensor_converter = _FreshOutputs()
    return mode


@contextlib.contextmanager
def simulated_gpu(gpu: Gpu) -> Iterator[Simulation]:
    """Run the block on fake tensors standing for tensors on `gpu`, recording its memory."""
    trace = Trace()
    functions = CudaFunctions(gpu)
    tracker = _StorageTracker(trace, gpu)
    checkpoint = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = functions.replaying_checkpoint(checkpoint)
    try:
        with _fake_mode(), tracker, functions:
            yield Simulation(gpu, trace, functions, tracker)
    finally:
        torch.utils.checkpoint.checkpoint = checkpoint
