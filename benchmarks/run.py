"""Speed and memory: vedit against the original Tune-A-Video recipe, side by side in one run.

Both recipes run over vedit's own inflated UNet with Stable Diffusion 1.5's shapes and random
weights (shapes.py) on the same device, in alternation (ABAB: each repeat runs a block of
steps of one recipe, then of the other), so that drift hits both and their ratio holds on any
machine. Every figure is the median over the repeats, with their min and max.

Rows (--rows):
  tune      the tuning step (recipes.py): time, peak memory, model and hardware FLOPs
  unet2d    the same step on the plain 2D UNet: the cost of inflation
  tune-run  vedit only: `vedit.tune.tune` itself (stages.py) on a real project, a short run
            projected to the default 500 steps; import, load and the whole command's peak
  edit      edit end to end, with and without a cached inversion: `vedit.edit.edit` itself
            (stages.py), models in memory, import and load apart; the original's pipeline

    python benchmarks/run.py                          # the full table, on a GPU
    python benchmarks/run.py --tiny --json            # the CPU form, seconds
    python benchmarks/run.py --predict                # predicted peaks only, on any machine

Rows run frame count by frame count in the order of --frames, so list the counts that matter
most first; with --budget-s a row that would not fit is skipped. Results go to
OUT/results.md and OUT/results.json after every row (OUT: --out, else $OUT, else
./benchmark-results).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import flops
import predict
import stages
import torch
from recipes import (
    ORIGINAL,
    RECIPES,
    VEDIT,
    Bench,
    StepCheck,
    Tuning,
    build_original_editing,
    build_tuning,
    dtype_name,
    original_edit,
    synchronize,
)
from shapes import Shapes, shapes_for

from vedit.errors import OutOfMemoryError as VeditOutOfMemoryError

KINDS = ("tune", "unet2d", "tune-run", "edit")
GIB = 2**30
#: Out of GPU memory: torch's error, or vedit's own, which tune and edit raise instead.
OUT_OF_MEMORY = (torch.OutOfMemoryError, VeditOutOfMemoryError)

#: Dense bf16 tensor-core peaks in TFLOP/s, by the exact name torch.cuda.get_device_name()
#: gives. Source: NVIDIA's datasheets for the H100, H200, A100, L40S, L40 and L4 (the figures
#: without sparsity, i.e. half the "with sparsity" ones).
BF16_PEAK_TFLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0,
    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.0, "NVIDIA L40": 181.0, "NVIDIA L4": 121.0,
}
PEAK_SOURCE = "NVIDIA datasheet, dense bf16 (benchmarks/run.py BF16_PEAK_TFLOPS)"

#: The table: (label, kind of measurement, metric). "inflation" is derived from tune and
#: unet2d; the rates from the FLOP counts and the step times.
TABLE: tuple[tuple[str, str, str], ...] = (
    ("tune step (s)", "tune", "step_s"),
    ("tune step peak memory (GB)", "tune", "peak_gb"),
    ("model TFLOP per step (UNet fwd+bwd, once)", "tune", "model_tflop"),
    ("hardware TFLOP per step (as run)", "tune", "hardware_tflop"),
    ("model TFLOP/s", "tune", "model_tflops"),
    ("hardware TFLOP/s", "tune", "hardware_tflops"),
    ("model FLOP/s, share of the bf16 peak (%)", "tune", "model_peak_pct"),
    ("same step, plain 2D UNet (s)", "unet2d", "step_s"),
    ("peak memory, plain 2D UNet (GB)", "unet2d", "peak_gb"),
    ("model TFLOP per step, plain 2D UNet", "unet2d", "model_tflop"),
    ("inflated / 2D step time", "inflation", "step_ratio"),
    ("inflated / 2D model FLOPs", "inflation", "flop_ratio"),
    ("vedit tune: import (s)", "tune-run", "import_s"),
    ("vedit tune: load the base model (s)", "tune-run", "load_s"),
    ("vedit tune: the short run, whole command (s)", "tune-run", "command_s"),
    ("vedit tune: step in that run (s)", "tune-run", "step_s"),
    ("vedit tune: checkpoint write (s)", "tune-run", "checkpoint_s"),
    ("vedit tune: 500 steps, projected (s)", "tune-run", "projected_s"),
    ("vedit tune: whole command peak memory (GB)", "tune-run", "peak_gb"),
    ("edit: import (s)", "edit", "import_s"),
    ("edit: load the models (s)", "edit", "load_s"),
    ("edit end to end (s)", "edit", "total_s"),
    ("edit with a cached inversion (s)", "edit", "cached_s"),
    ("edit: inversion (s)", "edit", "invert_s"),
    ("edit sampling step with guidance (s)", "edit", "sample_step_s"),
    ("edit: decode and write (s)", "edit", "decode_write_s"),
    ("edit peak memory (GB)", "edit", "peak_gb"),
    ("vedit edit: whole command peak memory, loading included (GB)", "edit", "command_peak_gb"),
)


@dataclass
class Stat:
    """A figure over repeats (one value for what does not vary, such as a FLOP count)."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.values), "max": max(self.values),
                "repeats": len(self.values), "values": self.values}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stat:
        return cls(list(data["values"]))


@dataclass(frozen=True)
class Task:
    """One row kind at one frame count, for every recipe."""

    kind: str
    frames: int


@dataclass
class Result:
    """One recipe's measurement of one kind at one frame count. `note` says why a row has no
    number (OOM, skipped, error); `checked_steps` and `failed_steps` count its timed steps
    and those with a non-finite loss or a skipped update; `levers` say how the recipe ran;
    `predicted_peak_gb` is the traced memory predictor's figure for the same row (merged
    from `--predicted-from`); where it is None the table has no predicted row."""

    kind: str
    recipe: str
    frames: int
    metrics: dict[str, Stat] = field(default_factory=dict)
    note: str = ""
    checked_steps: int = 0
    failed_steps: int = 0
    levers: dict[str, str] = field(default_factory=dict)
    predicted_peak_gb: float | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["metrics"] = {name: stat.to_dict() for name, stat in self.metrics.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        metrics = {name: Stat.from_dict(stat) for name, stat in data["metrics"].items()}
        return cls(**(data | {"metrics": metrics}))


def int_list(text: str) -> list[int]:
    """`8,24,16` to `[8, 24, 16]`, order kept (it is the order rows run in)."""
    return [int(part) for part in text.split(",") if part.strip()]


def parse_size(text: str, shapes: Shapes) -> tuple[int, int]:
    """`512` or `WIDTHxHEIGHT`, each a multiple of what the UNet's downsampling needs."""
    width, _, height = text.lower().partition("x")
    size = (int(height or width), int(width))
    unit = shapes.vae_scale_factor * 2 ** (len(shapes.unet["block_out_channels"]) - 1)
    if any(side <= 0 or side % unit for side in size):
        raise SystemExit(f"--size {text}: each side must be a positive multiple of {unit}")
    return size


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags, with the defaults that depend on --tiny filled in and checked."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="vedit.tiny_model's shapes instead of SD 1.5 (CPU form)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default 1 with --tiny: tiny shapes gain "
                             "nothing from more, and lose much when the cores are shared)")
    parser.add_argument("--frames", type=int_list, default=None,
                        help="tune and 2D frame counts, in the order run "
                             "(default 8,24,16,32,64,128; tiny 2,4)")
    parser.add_argument("--edit-frames", type=int_list, default=None,
                        help="edit frame counts (default 8,24; tiny 2)")
    parser.add_argument("--run-frames", type=int_list, default=None,
                        help="tune-run frame counts (default 24; tiny 2)")
    parser.add_argument("--size", default=None, help="512 or WIDTHxHEIGHT (default native)")
    parser.add_argument("--rows", default=",".join(KINDS),
                        help=f"which rows, of {','.join(KINDS)}")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--repeats", type=int, default=3,
                        help="blocks of steps (or edits) per recipe, in alternation")
    parser.add_argument("--steps", type=int, default=4, help="timed tuning steps per block")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed tuning steps after building each recipe")
    parser.add_argument("--run-steps", type=int, default=None,
                        help="steps of the tune-run (default 20; tiny 4; at least 4)")
    parser.add_argument("--edit-steps", type=int, default=None,
                        help="DDIM steps of the inversion and of the sampling (default 50; "
                             "tiny 2)")
    parser.add_argument("--guidance", type=float, default=12.5)
    parser.add_argument("--flops", choices=("inline", "off"), default="inline",
                        help="inline: count each tune and 2D row's FLOPs on the meta device "
                             "as it runs (flops.py); off: leave them to --flops-from")
    parser.add_argument("--flops-from", type=Path, default=None,
                        help="FLOP counts from `flops.py --json` (gpu.sh counts them in a "
                             "second process meanwhile), merged whenever results are written")
    parser.add_argument("--peak", type=float, default=None,
                        help="the device's bf16 peak TFLOP/s (default: from the device name)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the rows that would end past this many seconds")
    parser.add_argument("--keep-going", action="store_true",
                        help="record an unexpected error in its row and go on")
    parser.add_argument("--json", action="store_true",
                        help="print results.json on stdout instead of the table")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite OUT's results (with --flops-from)")
    parser.add_argument("--predict", action="store_true",
                        help="measure nothing: the planned tune, unet2d and edit rows' peak "
                             "memory as vedit.memory traces them on a simulated GPU (this "
                             "machine's, else an H100), into OUT/predicted.json")
    parser.add_argument("--predicted-from", type=Path, default=None,
                        help="a --predict run's predicted.json, shown next to the measured peaks")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmark-results")
    args = parser.parse_args(argv)
    args.shapes = shapes_for(args.tiny)
    args.threads = args.threads or (1 if args.tiny else torch.get_num_threads())
    args.frames = args.frames or ([2, 4] if args.tiny else [8, 24, 16, 32, 64, 128])
    args.edit_frames = args.edit_frames or ([2] if args.tiny else [8, 24])
    args.run_frames = args.run_frames or ([2] if args.tiny else [24])
    args.run_steps = args.run_steps or (4 if args.tiny else 20)
    args.edit_steps = args.edit_steps or (2 if args.tiny else 50)
    args.height, args.width = parse_size(args.size or str(args.shapes.resolution), args.shapes)
    args.rows = [kind for kind in args.rows.split(",") if kind]
    args.recipes = [recipe for recipe in args.recipes.split(",") if recipe]
    unknown = set(args.rows) - set(KINDS) | set(args.recipes) - set(RECIPES)
    if unknown:
        parser.error(f"unknown rows or recipes: {', '.join(sorted(unknown))}")
    if args.repeats < 1 or args.steps < 1 or args.run_steps < 4:
        parser.error("--repeats and --steps must be 1 or more, --run-steps 4 or more")
    return args


def plan(args: argparse.Namespace) -> list[Task]:
    """Every measurement, frame count by frame count in the order given."""
    counts = {"tune": args.frames, "unet2d": args.frames, "tune-run": args.run_frames,
              "edit": args.edit_frames}
    return [Task(kind, frames)
            for frames in dict.fromkeys(args.frames + args.run_frames + args.edit_frames)
            for kind in KINDS if kind in args.rows and frames in counts[kind]]


def bf16_peak(name: str) -> float | None:
    """A GPU's dense bf16 peak TFLOP/s from its exact name, or None when the table lacks it."""
    return BF16_PEAK_TFLOPS.get(name.strip())


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """--peak, else the GPU's peak by name; and where the figure came from."""
    if override is not None:
        return override, "--peak"
    if device.type != "cuda":
        return None, "none: not a GPU"
    name = torch.cuda.get_device_name(device)
    peak = bf16_peak(name)
    return peak, PEAK_SOURCE if peak else f"none: {name!r} is not in the table; pass --peak"


def device_name(device: torch.device) -> str:
    """What ran the rows, for the table's header: GPU name and memory, or CPU threads."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / GIB
        return f"{torch.cuda.get_device_name(device)} ({total:.0f} GB)"
    threads = torch.get_num_threads()
    return f"CPU ({platform.machine()}, {threads} thread{'' if threads == 1 else 's'})"


def describe(args: argparse.Namespace, bench: Bench, argv: list[str]) -> dict[str, Any]:
    """Where and how this run measured: enough to rerun it and to trust its ratios."""
    import accelerate
    import diffusers
    import peft
    import transformers

    import vedit

    return {
        "device": device_name(bench.device), "bf16_peak_tflops": args.peak_tflops,
        "bf16_peak_source": args.peak_source,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "peft": peft.__version__, "vedit": vedit.__version__, "commit": source_commit(),
        "python": platform.python_version(),
        "command": shlex.join(["python", "benchmarks/run.py", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shapes": bench.shapes.name, "size": f"{bench.width}x{bench.height}",
        "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup,
        "run_steps": args.run_steps, "edit_steps": args.edit_steps,
        "guidance": args.guidance, "budget_s": args.budget_s,
    }


def source_commit() -> str:
    """The commit measured: $VEDIT_COMMIT (the GPU machine's copy has no git), else git's,
    marked `+changes` when the tree differs from it."""
    if os.environ.get("VEDIT_COMMIT"):
        return os.environ["VEDIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                                capture_output=True, text=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 cwd=root, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return commit + ("+changes" if changes.strip() else "")


# -- memory ------------------------------------------------------------------------------------


def allocated(device: torch.device) -> int:
    """Bytes allocated on the GPU now (0 on a CPU: no memory rows there)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


@dataclass
class Peak:
    """The peak of one call above what was allocated when it started, on a GPU."""

    device: torch.device
    transient: int = 0

    def __enter__(self) -> Peak:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.base = allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.transient = torch.cuda.max_memory_allocated(self.device) - self.base


def peak_metric(device: torch.device, resident: int, transients: list[int]) -> dict[str, Stat]:
    """A recipe's peak while it ran: its own memory held between calls (weights, optimizer
    state, cached latents) plus what each call allocated on top; none on a CPU. The other
    recipe's memory, resident meanwhile, is not counted."""
    if device.type != "cuda" or not transients:
        return {}
    return {"peak_gb": Stat([(resident + t) / GIB for t in transients])}


# -- tune and 2D rows --------------------------------------------------------------------------


@dataclass
class Block:
    """One repeat of a recipe: the mean time of its steps, their checks, its memory on top."""

    seconds: float
    checks: list[StepCheck]
    transient: int


def time_block(tuning: Tuning, steps: int) -> Block:
    """`steps` timed optimizer steps of one recipe, the device synchronised around them."""
    tuning.activate()
    device = tuning.bench.device
    with Peak(device) as peak:
        started = time.perf_counter()
        checks = [tuning.step() for _ in range(steps)]
        synchronize(device)
        seconds = (time.perf_counter() - started) / steps
    return Block(seconds, checks, peak.transient)


def record_checks(result: Result, checks: list[StepCheck]) -> None:
    """Count the timed steps and those that failed their check; a failure is noted."""
    result.checked_steps = len(checks)
    result.failed_steps = sum(not check.ok for check in checks)
    if result.failed_steps:
        result.note = (f"{result.failed_steps} of {len(checks)} timed steps had a non-finite "
                       "loss or a skipped update (fp16 gradient scaler)")


class Runner:
    """Runs the tasks within the budget, skips what cannot fit, writes after every row."""

    def __init__(self, args: argparse.Namespace, bench: Bench, meta: dict[str, Any],
                 scratch: Path) -> None:
        self.args, self.bench, self.meta = args, bench, meta
        self.out = Path(args.out)
        self.results: list[Result] = []
        self.started = time.perf_counter()
        self.oom_at: dict[tuple[str, str], int] = {}
        self.scratch = scratch
        self.workspace = stages.Workspace(scratch, bench)  # writes its model on first use

    def elapsed(self) -> float:
        """Seconds since the run started, the measure of the budget."""
        return time.perf_counter() - self.started

    def recipes(self, task: Task) -> list[str]:
        """The recipes a row kind has: the stage rows are vedit's own, except edit's."""
        if task.kind == "tune-run":
            return [r for r in self.args.recipes if r == VEDIT]
        return self.args.recipes

    def skip_reason(self, task: Task, recipe: str) -> str:
        """Why not to run `recipe` at `task`: a smaller clip already ran out of memory."""
        oom = self.oom_at.get((task.kind, recipe))
        return f"not run: OOM at {oom} frames" if oom is not None and task.frames >= oom else ""

    def over_budget(self, task: Task) -> bool:
        """Whether the task would end past the budget: the last one of its kind, scaled by
        frames, says how long it takes."""
        budget = self.args.budget_s
        if budget is None:
            return False
        done = [r for r in self.results if r.kind == task.kind and r.metrics]
        estimate = 0.0
        if done:
            last = done[-1]
            estimate = sum(r.wall_s for r in self.results
                           if (r.kind, r.frames) == (last.kind, last.frames))
            estimate *= max(1.0, task.frames / last.frames)
        return self.elapsed() + estimate > budget

    def run(self, task: Task) -> list[Result]:
        """Measure one task for its recipes (or record why not), report and write."""
        results = {r: Result(task.kind, r, task.frames, note=self.skip_reason(task, r))
                   for r in self.recipes(task)}
        if self.over_budget(task):
            for result in results.values():
                result.note = result.note or "not run: time budget"
        todo = {r: result for r, result in results.items() if not result.note}
        if todo:
            self.measure(task, todo)
        for result in results.values():
            self.results.append(result)
            self.report(result)
        self.write()
        return list(results.values())

    def measure(self, task: Task, results: dict[str, Result]) -> None:
        """Fill `results`; out of memory and, with --keep-going, errors become notes."""
        measure = {"tune": measure_tuning, "unet2d": measure_tuning,
                   "tune-run": measure_tune_run, "edit": measure_edit}[task.kind]
        fresh_device(self.bench.device)
        started = time.perf_counter()
        try:
            measure(task, self, results)
        except Exception as error:
            if not self.args.keep_going:
                raise
            traceback.print_exc()
            for result in results.values():
                result.note = result.note or (
                    f"error: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
        seconds = (time.perf_counter() - started) / len(results)
        for result in results.values():
            result.wall_s = seconds
        fresh_device(self.bench.device)

    def out_of_memory(self, task: Task, result: Result) -> None:
        """Note an OOM; longer clips of that kind and recipe are not tried."""
        result.note = "OOM"
        key = (task.kind, result.recipe)
        self.oom_at[key] = min(self.oom_at.get(key, task.frames), task.frames)

    def report(self, result: Result) -> None:
        """One line per recipe and row on stderr, so a long GPU run shows where it is."""
        shown = ", ".join(f"{k} {v.median:.4g}" for k, v in result.metrics.items())
        print(f"[{self.elapsed():7.1f} s] {result.kind} {result.recipe} {result.frames} frames: "
              f"{shown or result.note}", file=sys.stderr, flush=True)

    def write(self) -> None:
        """results.json and results.md as they stand: a run cut short keeps its rows."""
        self.meta["wall_s"] = round(self.elapsed(), 1)
        write_results(self.out, self.meta, self.results, self.args.flops_from,
                      self.args.predicted_from)


def fresh_device(device: torch.device) -> None:
    """Free what the last row left."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_tuning(task: Task, runner: Runner, results: dict[str, Result]) -> None:
    """Build every recipe (each warmed up), then alternate blocks of timed steps, ABAB."""
    bench, args = runner.bench, runner.args
    tunings: dict[str, Tuning] = {}
    resident: dict[str, int] = {}
    blocks: dict[str, list[Block]] = {recipe: [] for recipe in results}
    try:
        for recipe, result in results.items():
            before = allocated(bench.device)
            try:
                tuning = build_tuning(recipe, task.frames, bench, inflated=task.kind == "tune")
                for _ in range(args.warmup):
                    tuning.step()
                synchronize(bench.device)
            except OUT_OF_MEMORY:
                runner.out_of_memory(task, result)
                continue
            tunings[recipe], result.levers = tuning, tuning.levers
            resident[recipe] = allocated(bench.device) - before
        for _ in range(args.repeats):
            for recipe in list(tunings):
                try:
                    blocks[recipe].append(time_block(tunings[recipe], args.steps))
                except OUT_OF_MEMORY:
                    runner.out_of_memory(task, results[recipe])
                    tunings.pop(recipe).release()
                    blocks[recipe] = []
                    fresh_device(bench.device)
        for recipe, tuning in tunings.items():
            result = results[recipe]
            done = blocks[recipe]
            result.metrics["step_s"] = Stat([b.seconds for b in done])
            result.metrics |= peak_metric(bench.device, resident[recipe],
                                          [b.transient for b in done])
            record_checks(result, [check for block in done for check in block.checks])
            if args.flops == "inline":
                result.metrics |= count_flops(task, recipe, tuning.checkpointing, bench)
    finally:
        for tuning in tunings.values():
            tuning.release()


def count_flops(task: Task, recipe: str, checkpointing: bool, bench: Bench) -> dict[str, Stat]:
    """The step's FLOP counts (flops.py, on the meta device), in TFLOP."""
    counts = flops.step_flops(recipe, task.frames, bench.shapes, bench.height, bench.width,
                              inflated=task.kind == "tune", checkpointing=checkpointing)
    return {f"{name}_tflop": Stat([value / flops.TERA]) for name, value in counts.items()}


# -- stage rows --------------------------------------------------------------------------------


def measure_tune_run(task: Task, runner: Runner, results: dict[str, Result]) -> None:
    """`vedit.tune.tune` itself on new projects, `--repeats` times, and its import."""
    result = results[VEDIT]
    runs = []
    for _ in range(runner.args.repeats):
        try:
            runs.append(stages.tune_as_run(runner.workspace, task.frames,
                                           runner.args.run_steps))
        except OUT_OF_MEMORY:
            runner.out_of_memory(task, result)
            return
    result.metrics["import_s"] = Stat([stages.import_seconds("vedit.tune")])
    for name in ("load_s", "command_s", "step_s", "checkpoint_s", "projected_s"):
        result.metrics[name] = Stat([getattr(run, name) for run in runs])
    peaks = [run.peak_gb for run in runs if run.peak_gb is not None]
    if peaks:
        result.metrics["peak_gb"] = Stat(peaks)
    result.levers = {"run": f"{runner.args.run_steps} steps, a checkpoint every "
                            f"{runs[0].steps // 2}; projected to 500 steps as this run plus its "
                            "median step for each step more"}


@dataclass
class Editor:
    """One recipe's edit as a callable, with its memory held between edits."""

    edit: Callable[[int, float, bool], dict[str, float]]
    resident: int
    metrics: dict[str, Stat]
    levers: dict[str, str]
    load_peak: int | None = None  # bytes at the peak of loading the models, as `vedit edit` does


def vedit_editor(task: Task, runner: Runner) -> Editor:
    """`vedit.edit.edit` on a tuned project, its models loaded once as `vedit edit` loads them."""
    project = stages.edit_project(runner.workspace, task.frames)
    before = allocated(runner.bench.device)
    with Peak(runner.bench.device) as loading:
        models, load_s = stages.load_models(project, runner.bench.device)
    resident = allocated(runner.bench.device) - before
    metrics = {"import_s": Stat([stages.import_seconds("vedit.edit")]),
               "load_s": Stat([load_s])}
    levers = {"weights": dtype_name(models.components.dtype) + ", LoRA adapters unmerged",
              "clip latents": "on the CPU, fp16; blended there every step",
              "VAE decode": "8 frames at a time",
              "files written": "video.mp4, compare.mp4 (from the source PNGs), edit.toml; the "
                               "inversion (fp16)"}
    return Editor(stages.StageEdit(project, models, runner.bench.device), resident, metrics,
                  levers, load_peak=loading.transient)


def original_editor(task: Task, runner: Runner) -> Editor:
    """The original pipeline's edit on models built in memory."""
    bench = runner.bench
    before = allocated(bench.device)
    editing = build_original_editing(task.frames, bench)
    folder = Path(tempfile.mkdtemp(prefix="original-", dir=runner.scratch))

    def edit(steps: int, guidance: float, cached: bool) -> dict[str, float]:
        inversion = folder / "inversion.safetensors" if cached else None
        seconds = original_edit(editing, steps, guidance, folder, cached_inversion=inversion)
        return {"total": sum(seconds.values()), "invert": seconds["invert"],
                "sample": seconds["sample"],
                "decode_write": seconds["decode"] + seconds["write"]}

    return Editor(edit, allocated(bench.device) - before, {}, editing.levers)


def measure_edit(task: Task, runner: Runner, results: dict[str, Result]) -> None:
    """Each recipe's edit warmed up (a 2-step edit), then in alternation: every recipe's full
    edit, then every recipe's edit from its cached inversion, `--repeats` times."""
    args, device = runner.args, runner.bench.device
    editors: dict[str, Editor] = {}
    for recipe in results:
        try:
            editor = (vedit_editor if recipe == VEDIT else original_editor)(task, runner)
            editor.edit(2, args.guidance, False)
        except OUT_OF_MEMORY:
            runner.out_of_memory(task, results[recipe])
            continue
        editors[recipe] = editor
    calls: dict[tuple[str, bool], list[dict[str, float]]] = {}
    transients: dict[str, list[int]] = {recipe: [] for recipe in editors}
    for _ in range(args.repeats):
        for cached in (False, True):
            for recipe in list(editors):
                try:
                    with Peak(device) as peak:
                        seconds = editors[recipe].edit(args.edit_steps, args.guidance, cached)
                except OUT_OF_MEMORY:
                    runner.out_of_memory(task, results[recipe])
                    del editors[recipe]
                    fresh_device(device)
                    continue
                calls.setdefault((recipe, cached), []).append(seconds)
                transients[recipe].append(peak.transient)
    for recipe, editor in editors.items():
        full, cached = calls[(recipe, False)], calls[(recipe, True)]
        result = results[recipe]
        result.levers = editor.levers
        result.metrics = editor.metrics | {
            "total_s": Stat([c["total"] for c in full]),
            "cached_s": Stat([c["total"] for c in cached]),
            "invert_s": Stat([c["invert"] for c in full]),
            "sample_step_s": Stat([c["sample"] / args.edit_steps for c in full + cached]),
            "decode_write_s": Stat([c["decode_write"] for c in full + cached]),
        } | peak_metric(device, editor.resident, transients[recipe])
        if "peak_gb" in result.metrics and editor.load_peak is not None:
            # the whole `vedit edit` command: loading, then an edit on the models it holds
            result.metrics["command_peak_gb"] = Stat(
                [max(editor.load_peak / GIB, peak) for peak in result.metrics["peak_gb"].values])


# -- the table ---------------------------------------------------------------------------------


def merge_flops(results: list[Result], counts: list[dict[str, Any]], size: str) -> None:
    """Add FLOP counts from `flops.py --json` to the tune and 2D results that lack them (the
    counts assume checkpointing on, as both recipes run on a GPU)."""
    found = {(c["recipe"], "tune" if c["unet"] == "inflated" else "unet2d", c["frames"]): c
             for c in counts if f"{c['size']}x{c['size']}" == size and c["checkpointing"]}
    for result in results:
        count = found.get((result.recipe, result.kind, result.frames))
        if (count and "step_s" in result.metrics and "model_tflop" not in result.metrics
                and result.levers.get("gradient checkpointing") == "on"):
            result.metrics |= {f"{name}_tflop": Stat([count[f"{name}_tflop"]])
                               for name in ("forward", "model", "hardware")}


def rates(result: Result, peak: float | None) -> dict[str, Stat]:
    """TFLOP/s from the counts and each repeat's step time, and the share of the peak."""
    step = result.metrics.get("step_s")
    derived = {}
    for name in ("model", "hardware"):
        count = result.metrics.get(f"{name}_tflop")
        if count and step:
            derived[f"{name}_tflops"] = Stat([count.median / s for s in step.values])
    if peak and "model_tflops" in derived:
        derived["model_peak_pct"] = Stat([100 * v / peak for v in derived["model_tflops"].values])
    return derived


def inflation_results(results: list[Result]) -> list[Result]:
    """Inflated over 2D, per recipe and frame count where both ran: the step time (ratio of
    the medians) and the model FLOPs."""
    by_key = {(r.kind, r.recipe, r.frames): r for r in results}
    derived = []
    for (kind, recipe, frames), inflated in by_key.items():
        plain = by_key.get(("unet2d", recipe, frames))
        if kind != "tune" or plain is None:
            continue
        metrics = {}
        for name, metric in (("step_ratio", "step_s"), ("flop_ratio", "model_tflop")):
            if metric in inflated.metrics and metric in plain.metrics:
                metrics[name] = Stat([inflated.metrics[metric].median
                                      / plain.metrics[metric].median])
        if metrics:
            derived.append(Result("inflation", recipe, frames, metrics))
    return derived


def ratio(original: Stat | None, vedit: Stat | None) -> Stat | None:
    """original / vedit: per repeat where both have one value per repeat (they alternated, so
    each pair ran side by side), else of the medians."""
    if not original or not vedit or not vedit.median:
        return None
    if len(original.values) == len(vedit.values) > 1 and all(vedit.values):
        return Stat([o / v for o, v in zip(original.values, vedit.values, strict=True)])
    return Stat([original.median / vedit.median])


def table_rows(results: list[Result], peak: float | None) -> list[dict[str, Any]]:
    """One row per (table row, frame count): each recipe's figure or note, and their ratio;
    a peak-memory row has a "predicted" row after it where a predictor gave a figure."""
    for result in results:
        result.metrics |= rates(result, peak)
    everything = results + inflation_results(results)
    rows = []
    for label, kind, metric in TABLE:
        mine = [r for r in everything if r.kind == kind]
        for frames in sorted({r.frames for r in mine}):
            cells = {r.recipe: r for r in mine if r.frames == frames}
            stats = {recipe: cells[recipe].metrics.get(metric) if recipe in cells else None
                     for recipe in RECIPES}
            notes = {recipe: r.note for recipe, r in cells.items() if r.note}
            if not any(stats.values()) and not notes:
                continue  # e.g. memory on a CPU, the original's import time
            paired = ratio(stats[ORIGINAL], stats[VEDIT])
            rows.append({"row": label, "kind": kind, "metric": metric, "frames": frames,
                         **{recipe: s.to_dict() if s else None for recipe, s in stats.items()},
                         "notes": notes, "ratio": paired.to_dict() if paired else None})
            predicted = {recipe: cells[recipe].predicted_peak_gb if recipe in cells else None
                         for recipe in RECIPES}
            if metric == "peak_gb" and any(value is not None for value in predicted.values()):
                rows.append({"row": label.replace("(GB)", "predicted (GB)"), "kind": kind,
                             "metric": "predicted_peak_gb", "frames": frames, **predicted,
                             "notes": {}, "ratio": None})
    return rows


def number(value: float) -> str:
    """Three significant digits."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def cell(value: dict[str, Any] | None, note: str = "") -> str:
    """A table cell: the median and (min-max) over repeats, or why there is no number."""
    if value is None:
        return note or "n/a"
    text = number(value["median"])
    if value["repeats"] > 1 and number(value["min"]) != number(value["max"]):
        text += f" ({number(value['min'])}-{number(value['max'])})"
    return text


def predicted_cell(value: float | None) -> str:
    """A predicted figure, or "-" for a recipe the predictor gave none."""
    return "-" if value is None else number(value)


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], results: list[Result]) -> str:
    """The table as BENCHMARKS.md shows it, with the facts that make it reproducible."""
    peak = meta["bf16_peak_tflops"]
    lines = [
        f"- device: {meta['device']}; bf16 peak: "
        + (f"{peak:g} TFLOP/s ({meta['bf16_peak_source']})" if peak
           else meta["bf16_peak_source"]),
        f"- torch {meta['torch']}, diffusers {meta['diffusers']}, transformers "
        f"{meta['transformers']}, accelerate {meta['accelerate']}, peft {meta['peft']}, "
        f"vedit {meta['vedit']} (commit {meta['commit']}), Python {meta['python']}",
        f"- shapes {meta['shapes']}, {meta['size']}, batch 1; the median (min-max) over "
        f"{meta['repeats']} repeats, the recipes in alternation; tuning: {meta['warmup']} "
        f"warm-up steps, then blocks of {meta['steps']} timed steps; the tune run: "
        f"{meta['run_steps']} steps; editing: {meta['edit_steps']} + {meta['edit_steps']} DDIM "
        f"steps, guidance {meta['guidance']:g}",
        f"- {meta['date']}, {meta.get('wall_s', 0):.0f} s" + (
            f" of a {meta['budget_s']:g} s budget" if meta["budget_s"] is not None else ""),
        f"- command: `{meta['command']}`",
        "",
        "| row | frames | original | vedit | original / vedit |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        notes = row["notes"]
        if row["metric"] == "predicted_peak_gb":
            cells = [predicted_cell(row[ORIGINAL]), predicted_cell(row[VEDIT]), ""]
        else:
            cells = [cell(row[ORIGINAL], notes.get(ORIGINAL, "")),
                     cell(row[VEDIT], notes.get(VEDIT, "")), cell(row["ratio"])]
        lines.append(f"| {row['row']} | {row['frames']} | {' | '.join(cells)} |")
    return "\n".join([*lines, "", *lever_notes(results)]) + "\n"


def lever_notes(results: list[Result]) -> list[str]:
    """Per row kind, every lever in which the recipes differed, as a table (a ratio is only as
    like for like as it says), and what the checks of the timed steps found."""
    tables: dict[tuple[tuple[str, ...], ...], list[str]] = {}
    for kind in KINDS:
        by_recipe: dict[str, dict[str, str]] = {}
        for result in results:
            if result.kind == kind and result.levers:
                by_recipe.setdefault(result.recipe, {}).update(result.levers)
        names = dict.fromkeys(name for levers in by_recipe.values() for name in levers)
        differ = tuple(
            (name, *(by_recipe.get(recipe, {}).get(name, "n/a") for recipe in RECIPES))
            for name in names
            if len(by_recipe) == 1 or len({lv.get(name) for lv in by_recipe.values()}) > 1)
        if differ:
            tables.setdefault(differ, []).append(kind)
    lines = []
    for differ, kinds in tables.items():
        if all(cells[1] == "n/a" for cells in differ):  # vedit's own rows
            lines += [f"The rows {', '.join(kinds)} (vedit only): "
                      + "; ".join(f"{name}: {mine}" for name, _, mine in differ) + ".", ""]
            continue
        lines += [f"How the recipes differ in the rows {', '.join(kinds)}:", "",
                  "| lever | original | vedit |", "| --- | --- | --- |"]
        lines += [f"| {' | '.join(cells)} |" for cells in differ]
        lines.append("")
    checked = sum(r.checked_steps for r in results)
    if checked:
        failed = [f"{r.kind} {r.recipe} at {r.frames} frames: {r.note}"
                  for r in results if r.failed_steps]
        lines.append(f"Checked, every timed tuning step ({checked} in all): a finite loss and "
                     "an applied update; " + ("; ".join(failed) if failed else "all passed")
                     + ".")
    return lines


def write_results(out: Path, meta: dict[str, Any], results: list[Result],
                  flops_from: Path | None, predicted_from: Path | None = None
                  ) -> dict[str, Any]:
    """Write OUT/results.json and OUT/results.md; returns the JSON data."""
    results = [Result.from_dict(r.to_dict()) for r in results]  # counts and rates: copies
    if flops_from is not None and flops_from.is_file():
        with contextlib.suppress(json.JSONDecodeError):  # still being written: a later write
            merge_flops(results, json.loads(flops_from.read_text()), meta["size"])
    if predicted_from is not None and predicted_from.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            merge_predicted(results, json.loads(predicted_from.read_text()))
    rows = table_rows(results, meta["bf16_peak_tflops"])
    data = {"meta": meta, "table": rows, "results": [r.to_dict() for r in results]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "results.md").write_text(markdown(meta, rows, results))
    return data


def render(args: argparse.Namespace) -> dict[str, Any]:
    """Rewrite OUT's results from its results.json (e.g. with FLOPs counted, or peaks
    predicted, meanwhile)."""
    out = Path(args.out)
    data = json.loads((out / "results.json").read_text())
    results = [Result.from_dict(r) for r in data["results"]]
    return write_results(out, data["meta"], results, args.flops_from, args.predicted_from)


def main(argv: list[str] | None = None) -> int:
    """Run the planned rows and write the table; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.predict:
        predicted = predict_all(args)
        print(json.dumps(predicted, indent=2) if args.json else "\n".join(
            f"{p['row']:8} {p['recipe']:9} {p['frames']:4} frames  "
            + ("not predicted" if p["predicted_peak_gb"] is None
               else f"{p['predicted_peak_gb']:.2f} GB") for p in predicted))
        return 0
    data = render(args) if args.render else measure_all(args, argv)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print((Path(args.out) / "results.md").read_text())
    return 0


def predict_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The predicted peak of every planned row the predictor covers, without running any;
    OUT/predicted.json is rewritten after each, so a run cut short keeps what it had."""
    gpu = predict.target_gpu()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    predicted: list[dict[str, Any]] = []
    for task in plan(args):
        if task.kind not in predict.ROW_NAMES:
            continue
        for recipe in args.recipes:
            peak = predict.predicted_peak_gb(task.kind, recipe, task.frames, args.shapes,
                                             args.height, args.width, gpu)
            predicted.append({"recipe": recipe, "row": predict.ROW_NAMES[task.kind],
                              "frames": task.frames, "predicted_peak_gb": peak,
                              "gpu": gpu.name})
            print(f"predicted {task.kind} {recipe} {task.frames} frames: {peak}",
                  file=sys.stderr, flush=True)
            (out / "predicted.json").write_text(json.dumps(predicted, indent=2) + "\n")
    return predicted


def merge_predicted(results: list[Result], predicted: list[dict[str, Any]]) -> None:
    """Put each predicted peak on the measured result of the same row, recipe and frames."""
    kinds = {name: kind for kind, name in predict.ROW_NAMES.items()}
    figures = {(kinds.get(p["row"]), p["recipe"], p["frames"]): p["predicted_peak_gb"]
               for p in predicted}
    for result in results:
        result.predicted_peak_gb = figures.get((result.kind, result.recipe, result.frames),
                                               result.predicted_peak_gb)


def measure_all(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every planned task, then the results written once more."""
    device = torch.device(args.device)
    args.peak_tflops, args.peak_source = peak_tflops(device, args.peak)
    bench = Bench(args.shapes, device, args.height, args.width)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="vedit-bench-") as scratch:
            runner = Runner(args, bench, describe(args, bench, argv), Path(scratch))
            for task in plan(args):
                runner.run(task)
            runner.meta["wall_s"] = round(runner.elapsed(), 1)
            return write_results(runner.out, runner.meta, runner.results, args.flops_from,
                                 args.predicted_from)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
