"""The benchmark's rows as the memory model predicts them, traced on a simulated GPU.

`run.py --predict` prints them without running anything, and a GPU run records them next to
what it measured (`run.py --predicted-from`), so the model is checked wherever a device is
lent. The tune rows trace the recipes' own tuning state (recipes.py, its Accelerator swapped
for the simulated GPU's) and one step of it, with the optimizer's state made first (as at
every step after the first); the `vedit` edit row traces what `vedit edit` runs
(vedit.memory.predict.trace_edit) on a config-only folder of these shapes. The `original`
edit row (fp16, no LoRA, the clip decoded in one call) is not predicted.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path
from unittest import mock

import recipes
from recipes import ORIGINAL, Bench, build_tuning
from shapes import Shapes, write_configs

from vedit.memory.accelerator import prime_optimizer
from vedit.memory.gpu import GIB, Gpu, current_gpu
from vedit.memory.predict import EditPlan, trace_edit
from vedit.memory.trace import Trace, simulated_gpu
from vedit.models import resolve_model
from vedit.settings import EditSettings, TuneSettings, parse_targets

#: run.py's kinds of row that are predicted, and their names in `--predict --json`.
ROW_NAMES = {"tune": "tune", "unet2d": "tune_2d", "edit": "edit"}

#: The GPU predicted for off a GPU: the one issue 10's original-recipe figures were measured on.
H100 = Gpu("H100 80GB (assumed)", 80 * GIB, (9, 0), capability_known=False)


def target_gpu() -> Gpu:
    """This machine's GPU, else an H100."""
    return current_gpu() or H100


def trace_tuning(recipe: str, frames: int, shapes: Shapes, height: int, width: int,
                 gpu: Gpu, *, inflated: bool = True) -> Trace:
    """One tuning step of `recipe` with its GPU defaults (fp16 autocast for the original, bf16
    for vedit where the GPU has it; checkpointing; fused AdamW for vedit)."""
    original = recipe == ORIGINAL
    precision = "fp16" if original or not gpu.bf16 else "bf16"
    with simulated_gpu(gpu) as sim:
        bench = Bench(shapes, sim.device, height, width)
        simulated = mock.patch.object(recipes, "fresh_accelerator",
                                      lambda precision, bench: sim.accelerator(precision))
        with sim.untraced(), simulated:
            tuning = build_tuning(recipe, frames, bench, inflated=inflated,
                                  mixed_precision=precision, checkpointing=True,
                                  fused=not original)
            prime_optimizer(tuning.optimizer)
        with sim.trace.section("the training step"):
            tuning.step()
    return sim.trace


@cache
def _config_folder(shapes: Shapes) -> Path:
    return write_configs(shapes, Path(tempfile.mkdtemp(prefix="vedit-shapes-")) / shapes.name)


def predicted_peak_gb(kind: str, recipe: str, frames: int, shapes: Shapes, height: int,
                      width: int, gpu: Gpu) -> float | None:
    """The predicted peak (GB = 2^30 bytes) of one benchmark row; None where not predicted."""
    if kind == "edit":
        if recipe == ORIGINAL:
            return None
        source = resolve_model(_config_folder(shapes), configs_only=True)
        plan = EditPlan(source, frames, height, width, EditSettings(), TuneSettings.rank,
                        parse_targets([TuneSettings.lora_targets]))
        trace = trace_edit(plan, gpu)
    else:
        trace = trace_tuning(recipe, frames, shapes, height, width, gpu,
                             inflated=kind == "tune")
    return round(trace.replay().peak_allocated / GIB, 4)  # tiny shapes peak near 0.1 GB
