"""accelerate's `Accelerator` as it behaves on one GPU, for training steps traced on no GPU.

A real Accelerator cannot be made for a simulated device: it finds its device from the
machine, and its autocast would be the CPU's. This one does, for the calls vedit's `build_run`
and `train_step` (and the benchmarks' original recipe) make, what accelerate does on one CUDA
device with memory effects: `prepare` wraps the model's forward in CUDA autocast with its
outputs made fp32 (accelerate's own `convert_outputs_to_fp32`), and gives the optimizer the
foreach implementation PyTorch picks for CUDA parameters; `backward` scales the loss for
accumulation (and fp16's gradient scaler); optimizer steps wait for gradients to be
accumulated, as `accumulate` and `AcceleratedOptimizer` do. The gradient scaler's unscaling is
in place and its checks read values, so they are left out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from vedit.memory.autocast import AutocastState, autocast_forward

if TYPE_CHECKING:
    from vedit.memory.trace import Simulation

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_LOSS_SCALE = 2.0**16  # GradScaler's initial scale


class _Optimizer:
    """The prepared optimizer: `step` and `zero_grad` only once gradients are accumulated."""

    def __init__(self, optimizer: torch.optim.Optimizer, accelerator: SimulatedAccelerator):
        self.optimizer = optimizer
        self.accelerator = accelerator

    def step(self) -> None:
        if self.accelerator.sync_gradients:
            self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.accelerator.sync_gradients:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def step_was_skipped(self) -> bool:
        """As accelerate's: a traced step never overflows, so its update is never skipped."""
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


class SimulatedAccelerator:
    """The part of accelerate's `Accelerator` that vedit's training steps use, on one GPU."""

    process_index = 0
    num_processes = 1
    is_main_process = True

    def __init__(self, simulation: Simulation, mixed_precision: str,
                 gradient_accumulation_steps: int = 1) -> None:
        self.simulation = simulation
        self.mixed_precision = mixed_precision
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self._batches = 0

    @property
    def device(self) -> torch.device:
        return self.simulation.device

    @property
    def sync_gradients(self) -> bool:
        return self._batches % self.gradient_accumulation_steps == 0

    def prepare(self, *objects: Any) -> Any:
        prepared = tuple(self._prepare(o) for o in objects)
        return prepared[0] if len(prepared) == 1 else prepared

    def _prepare(self, thing: Any) -> Any:
        if isinstance(thing, torch.nn.Module) and self.mixed_precision in _DTYPES:
            thing.forward = autocast_forward(self.simulation.functions, thing.forward,
                                             _DTYPES[self.mixed_precision])
        if isinstance(thing, torch.optim.Optimizer):
            for group in thing.param_groups:
                if not group.get("fused") and group.get("foreach") is None:
                    group["foreach"] = True  # what PyTorch picks for CUDA parameters
            return _Optimizer(thing, self)
        return thing

    @contextlib.contextmanager
    def accumulate(self, model: Any) -> Iterator[None]:
        self._batches += 1
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.gradient_accumulation_steps
        if self.mixed_precision == "fp16":
            loss = loss * _LOSS_SCALE
        loss.backward()

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def autocast(self) -> Any:
        if self.mixed_precision not in _DTYPES:
            return contextlib.nullcontext()
        return self.simulation.functions.region(
            AutocastState(True, _DTYPES[self.mixed_precision]))

    def unwrap_model(self, model: Any) -> Any:
        return model

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def prime_optimizer(optimizer: Any) -> None:
    """Give `optimizer` its state, as after a first step (from zero gradients): tracing one step
    then shows the steady state without tracing two."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:  # frozen ones never get a gradient, nor state
                param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
