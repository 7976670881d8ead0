"""Speed and memory: vedit against the original Tune-A-Video recipe, side by side in one run.

Both recipes (recipes.py) run over vedit's own inflated UNet with Stable Diffusion 1.5's shapes
and random weights (shapes.py), one after the other on the same device, so their ratio holds
on any machine. Rows: the tuning step's time and peak GPU memory per frame count (until out of
memory), the same step on the plain 2D UNet (the cost of inflation), achieved TFLOP/s against
the device's bf16 peak, and editing end to end (50 inversion + 50 sampling steps with
guidance, VAE decode, mp4 write), with and without a cached inversion.

    python benchmarks/run.py                                   # the full table, on a GPU
    python benchmarks/run.py --tiny --frames 2,4 --edit-steps 2  # the CPU form, seconds

Rows run in the order of --frames (each count's tune, 2D and edit rows together), so list the
counts that matter most first; with --budget-s the rows that would not fit are skipped.
Results go to OUT/results.md and OUT/results.json after every row (OUT: --out, else $OUT,
else ./benchmark-results).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from recipes import (
    RECIPES,
    Bench,
    build_editing,
    build_tuning,
    edit_clip,
    synchronize,
    warm_up_editing,
)
from shapes import Shapes, shapes_for

KINDS = ("tune", "unet2d", "edit")
GIB = 2**30

#: Dense bf16 tensor-core peaks in TFLOP/s (NVIDIA datasheets, without sparsity). The first
#: name found in torch.cuda.get_device_name() wins, so the more specific names come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)

#: The table: (row, kind of measurement, metric). "inflation" is derived from tune and unet2d.
TABLE: tuple[tuple[str, str, str], ...] = (
    ("tune step (s)", "tune", "step_s"),
    ("tune peak memory (GB)", "tune", "peak_gb"),
    ("tune achieved TFLOP/s", "tune", "tflops"),
    ("tune share of the bf16 peak (%)", "tune", "peak_pct"),
    ("same step, plain 2D UNet (s)", "unet2d", "step_s"),
    ("peak memory, plain 2D UNet (GB)", "unet2d", "peak_gb"),
    ("inflated / 2D step time", "inflation", "ratio"),
    ("edit end to end (s)", "edit", "total_s"),
    ("edit with a cached inversion (s)", "edit", "cached_s"),
    ("edit sampling step with guidance (s)", "edit", "sample_step_s"),
    ("edit peak memory (GB)", "edit", "peak_gb"),
)


@dataclass(frozen=True)
class Task:
    kind: str
    recipe: str
    frames: int


@dataclass
class Result:
    """One recipe's measurement of one kind at one frame count; `note` says why a row has no
    number (OOM, skipped, error)."""

    kind: str
    recipe: str
    frames: int
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""
    wall_s: float = 0.0


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
                        help="tune frame counts, in the order run (default 8,24,16,32,64,128; "
                             "tiny 2,4)")
    parser.add_argument("--edit-frames", type=int_list, default=None,
                        help="edit frame counts (default 8,24; tiny 2,4)")
    parser.add_argument("--size", default=None, help="512 or WIDTHxHEIGHT (default native)")
    parser.add_argument("--rows", default=",".join(KINDS),
                        help=f"which rows, of {','.join(KINDS)}")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--steps", type=int, default=5, help="timed tuning steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed tuning steps first")
    parser.add_argument("--edit-steps", type=int, default=50,
                        help="DDIM steps of the inversion and of the sampling")
    parser.add_argument("--guidance", type=float, default=12.5)
    parser.add_argument("--no-flops", dest="flops", action="store_false",
                        help="skip the extra step counted by FlopCounterMode")
    parser.add_argument("--peak", type=float, default=None,
                        help="the device's bf16 peak TFLOP/s (default: from the device name)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the rows that would end past this many seconds")
    parser.add_argument("--keep-going", action="store_true",
                        help="record an unexpected error in its row and go on")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmark-results")
    args = parser.parse_args(argv)
    args.shapes = shapes_for(args.tiny)
    args.threads = args.threads or (1 if args.tiny else torch.get_num_threads())
    args.frames = args.frames or ([2, 4] if args.tiny else [8, 24, 16, 32, 64, 128])
    args.edit_frames = args.edit_frames or ([2, 4] if args.tiny else [8, 24])
    args.height, args.width = parse_size(args.size or str(args.shapes.resolution), args.shapes)
    args.rows = [kind for kind in args.rows.split(",") if kind]
    args.recipes = [recipe for recipe in args.recipes.split(",") if recipe]
    unknown = set(args.rows) - set(KINDS) | set(args.recipes) - set(RECIPES)
    if unknown:
        parser.error(f"unknown rows or recipes: {', '.join(sorted(unknown))}")
    return args


def plan(args: argparse.Namespace) -> list[Task]:
    """Every measurement, frame count by frame count in the order given."""
    tasks = []
    for frames in dict.fromkeys(args.frames + args.edit_frames):
        for kind in KINDS:
            counts = args.edit_frames if kind == "edit" else args.frames
            if kind in args.rows and frames in counts:
                tasks += [Task(kind, recipe, frames) for recipe in args.recipes]
    return tasks


def bf16_peak(name: str) -> float | None:
    """A GPU's dense bf16 peak TFLOP/s from its name, or None when the table lacks it."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """--peak, else the GPU's peak by name; a CPU has no entry."""
    if override is not None or device.type != "cuda":
        return override
    return bf16_peak(torch.cuda.get_device_name(device))


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
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "peft": peft.__version__, "vedit": vedit.__version__, "commit": source_commit(),
        "python": platform.python_version(),
        "command": shlex.join(["python", "benchmarks/run.py", *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shapes": bench.shapes.name, "size": f"{bench.width}x{bench.height}",
        "steps": args.steps, "warmup": args.warmup, "edit_steps": args.edit_steps,
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


def fresh_device(device: torch.device) -> None:
    """Free what the last row left and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)


def reset_peak(device: torch.device) -> None:
    """Count the peak from here: the models are built (building casts from fp32, a transient
    that `vedit` does not have: it loads weights in their dtype)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> dict[str, float]:
    """Peak allocated (the row) and reserved (for the memory model's margin) since reset."""
    if device.type != "cuda":
        return {}
    return {"peak_gb": torch.cuda.max_memory_allocated(device) / GIB,
            "reserved_gb": torch.cuda.max_memory_reserved(device) / GIB}


def count_flops(step: Any) -> int:
    """FLOPs of one call of `step` (matmuls, convolutions, attention), as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure_tuning(task: Task, bench: Bench, args: argparse.Namespace) -> dict[str, float]:
    """Time `--steps` optimizer steps after `--warmup`; peak memory; TFLOP/s of one more."""
    tuning = build_tuning(task.recipe, task.frames, bench, inflated=task.kind == "tune")
    reset_peak(bench.device)
    try:
        for _ in range(args.warmup):
            tuning.step()
        synchronize(bench.device)
        started = time.perf_counter()
        losses = [tuning.step() for _ in range(args.steps)]
        synchronize(bench.device)
        seconds = (time.perf_counter() - started) / args.steps
        metrics = {"step_s": seconds, "loss": sum(losses) / len(losses), **peak_gb(bench.device)}
        if args.flops and task.kind == "tune":
            metrics.update(flop_rates(count_flops(tuning.step), seconds, args.peak_tflops))
        return metrics
    finally:
        tuning.release()


def flop_rates(flops: int, seconds: float, peak: float | None) -> dict[str, float]:
    """TFLOP per step, achieved TFLOP/s and, with a known peak, its share in percent."""
    rates = {"tflop_per_step": flops / 1e12, "tflops": flops / seconds / 1e12}
    if peak:
        rates["peak_pct"] = 100 * rates["tflops"] / peak
    return rates


def measure_edit(task: Task, bench: Bench, args: argparse.Namespace) -> dict[str, float]:
    """Edit end to end, then again from the inversion the first run cached."""
    editing = build_editing(task.recipe, task.frames, bench)
    warm_up_editing(editing)
    reset_peak(bench.device)
    with tempfile.TemporaryDirectory(prefix="vedit-bench-") as scratch:
        folder = Path(scratch)
        full = edit_clip(editing, args.edit_steps, args.guidance, folder)
        cached = edit_clip(editing, args.edit_steps, args.guidance, folder,
                           cached_inversion=folder / "inversion.safetensors")
    return {"total_s": sum(full.values()), "cached_s": sum(cached.values()),
            "sample_step_s": full["sample"] / args.edit_steps,
            **{f"{name}_s": seconds for name, seconds in full.items()},
            **peak_gb(bench.device)}


class Runner:
    """Runs the tasks within the budget, skips what cannot fit, writes after every row."""

    def __init__(self, args: argparse.Namespace, bench: Bench, meta: dict[str, Any]) -> None:
        self.args, self.bench, self.meta = args, bench, meta
        self.out = Path(args.out)
        self.results: list[Result] = []
        self.started = time.perf_counter()
        self.oom_at: dict[tuple[str, str], int] = {}

    def elapsed(self) -> float:
        """Seconds since the run started, the measure of the budget."""
        return time.perf_counter() - self.started

    def skip_reason(self, task: Task) -> str:
        """Why not to run `task`: a smaller clip already ran out of memory, or the budget."""
        oom = self.oom_at.get((task.kind, task.recipe))
        if oom is not None and task.frames >= oom:
            return f"not run: OOM at {oom} frames"
        budget = self.args.budget_s
        if budget is not None and self.elapsed() + self.estimate(task) > budget:
            return "not run: time budget"
        return ""

    def estimate(self, task: Task) -> float:
        """Seconds the task will take: the last run of its kind and recipe, scaled by frames."""
        done = [r for r in self.results
                if (r.kind, r.recipe) == (task.kind, task.recipe) and r.metrics]
        if not done:
            return 0.0
        last = done[-1]
        return last.wall_s * max(1.0, task.frames / last.frames)

    def run(self, task: Task) -> Result:
        """Measure one task (or record why not), report it and rewrite the results."""
        result = Result(task.kind, task.recipe, task.frames, note=self.skip_reason(task))
        if not result.note:
            self.measure(task, result)
        self.results.append(result)
        self.report(result)
        self.write()
        return result

    def measure(self, task: Task, result: Result) -> None:
        """Fill `result`; out of memory and, with --keep-going, errors become notes."""
        measure = measure_edit if task.kind == "edit" else measure_tuning
        fresh_device(self.bench.device)
        started = time.perf_counter()
        try:
            result.metrics = measure(task, self.bench, self.args)
        except torch.OutOfMemoryError:
            result.note = "OOM"
            previous = self.oom_at.get((task.kind, task.recipe), task.frames)
            self.oom_at[(task.kind, task.recipe)] = min(previous, task.frames)
        except Exception as error:
            if not self.args.keep_going:
                raise
            traceback.print_exc()
            result.note = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        result.wall_s = time.perf_counter() - started
        fresh_device(self.bench.device)

    def report(self, result: Result) -> None:
        """One line per row on stderr, so a long GPU run shows where it is."""
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()) or result.note
        print(f"[{self.elapsed():7.1f} s] {result.kind} {result.recipe} {result.frames} frames: "
              f"{shown}", file=sys.stderr, flush=True)

    def write(self) -> None:
        """results.json and results.md as they stand: a run cut short keeps its rows."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.meta["wall_s"] = round(self.elapsed(), 1)
        table = table_rows(self.results)
        data = {"meta": self.meta, "table": table, "results": [asdict(r) for r in self.results]}
        (self.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
        (self.out / "results.md").write_text(markdown(self.meta, table))


def inflation_results(results: list[Result]) -> list[Result]:
    """Inflated over 2D step time, per recipe and frame count, where both ran."""
    steps = {(r.kind, r.recipe, r.frames): r.metrics.get("step_s") for r in results}
    derived = []
    for (kind, recipe, frames), seconds in steps.items():
        plain = steps.get(("unet2d", recipe, frames))
        if kind == "tune" and seconds and plain:
            derived.append(Result("inflation", recipe, frames, {"ratio": seconds / plain}))
    return derived


def table_rows(results: list[Result]) -> list[dict[str, Any]]:
    """One row per (table row, frame count): each recipe's value or note, and their ratio."""
    everything = results + inflation_results(results)
    rows = []
    for label, kind, metric in TABLE:
        mine = [r for r in everything if r.kind == kind]
        for frames in sorted({r.frames for r in mine}):
            cells = {r.recipe: r for r in mine if r.frames == frames}
            values = {recipe: cells[recipe].metrics.get(metric) if recipe in cells else None
                      for recipe in RECIPES}
            if not any(values.values()) and not any(r.note for r in cells.values()):
                continue  # e.g. memory on a CPU, TFLOP/s with --no-flops
            original, vedit = values["original"], values["vedit"]
            rows.append({"row": label, "frames": frames, **values,
                         "notes": {k: r.note for k, r in cells.items() if r.note},
                         "ratio": original / vedit if original and vedit else None})
    return rows


def cell(value: float | None, note: str = "") -> str:
    """A table cell: three significant digits, or why there is no number."""
    if value is None:
        return note or "n/a"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The table as BENCHMARKS.md shows it, with the facts that make it reproducible."""
    peak = meta["bf16_peak_tflops"]
    lines = [
        f"- device: {meta['device']}" + (f", bf16 peak {peak:g} TFLOP/s" if peak else ""),
        f"- torch {meta['torch']}, diffusers {meta['diffusers']}, transformers "
        f"{meta['transformers']}, accelerate {meta['accelerate']}, peft {meta['peft']}, "
        f"vedit {meta['vedit']} ({meta['commit']}), Python {meta['python']}",
        f"- shapes {meta['shapes']}, {meta['size']}, batch 1; tuning: {meta['warmup']} warm-up "
        f"+ {meta['steps']} timed steps; editing: {meta['edit_steps']} + {meta['edit_steps']} "
        f"DDIM steps, guidance {meta['guidance']:g}",
        f"- {meta['date']}, {meta['wall_s']:.0f} s" + (
            f" of a {meta['budget_s']:g} s budget" if meta["budget_s"] is not None else ""),
        f"- command: `{meta['command']}`",
        "",
        "| row | frames | original | vedit | original / vedit |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        notes = row["notes"]
        lines.append(f"| {row['row']} | {row['frames']} | "
                     f"{cell(row['original'], notes.get('original', ''))} | "
                     f"{cell(row['vedit'], notes.get('vedit', ''))} | "
                     f"{cell(row['ratio'], '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the planned rows and write the table; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    args.peak_tflops = peak_tflops(device, args.peak)
    bench = Bench(args.shapes, device, args.height, args.width)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        runner = Runner(args, bench, describe(args, bench, argv))
        for task in plan(args):
            runner.run(task)
        runner.write()
    finally:
        torch.set_num_threads(threads)
    print((runner.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
