"""Peak GPU memory of tuning and editing from frames and size: the model for `--dry-run`.

    peak = weights + trained state + activations + overhead

- weights and trained state come from first principles: the real parameter counts of the
  inflated SD 1.5 UNet, its LoRA adapters, the VAE and the text encoder (built on the meta
  device, so nothing is allocated), times the bytes each recipe keeps per parameter (fp32 or
  half weights, fp32 gradients, AdamW's two fp32 moments);
- activations are `bytes_per_frame_pixel * frames * latent pixels`: with SDPA attention
  (flash or memory-efficient) every term of the UNet's activations grows linearly in frames
  and in latent pixels, sparse-causal and temporal attention included;
- overhead is what first principles miss (autocast's half copies of fp32 weights, allocator
  rounding, kernel workspaces): a constant.

The two constants are fitted by least squares to measured peaks (`MEASURED`): for the
original recipe, issue 10's H100 measurements; for vedit and for editing, none yet, so they
use the stand-ins in `STAND_INS` and `is_calibrated` says so. To calibrate after a GPU run:

    python benchmarks/memory_model.py fit OUT/results.json    # prints entries for MEASURED
    python benchmarks/memory_model.py predict --frames 24 --size 512 --device-total-gb 80
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from shapes import SD15, Shapes, build_text_encoder, build_unet, build_vae

from vedit.inflate import inflate_unet
from vedit.lora import add_lora
from vedit.settings import TuneSettings, parse_targets

GIB = 2**30
STAGES = ("tune", "edit")
RECIPES = ("original", "vedit")
ADAM_BYTES = 4 + 8  # an fp32 gradient and AdamW's two fp32 moments per trained parameter
CONTEXT_GB = 0.5  # the CUDA context and kernels: on the card, outside torch's allocator
FRAGMENTATION = 0.05  # share of the card the caching allocator may hold beyond its peak

#: Measured peaks, GB (2**30 bytes), at batch 1: (frames, height, width, peak_gb) per
#: (stage, recipe), and where they come from.
MEASURED: dict[tuple[str, str], tuple[str, list[tuple[int, int, int, float]]]] = {
    ("tune", "original"): (
        "issue 10: the original recipe on one H100 80 GB, torch 2.11, random weights",
        [(8, 512, 512, 8.2), (24, 512, 512, 16.3), (32, 512, 512, 20.3),
         (64, 512, 512, 36.5)]),
}

#: Until a stage and recipe has measurements: (bytes per frame per latent pixel, source).
STAND_INS: dict[tuple[str, str], tuple[float | None, str]] = {
    ("tune", "vedit"): (None, "the original recipe's fitted constant (likely high: it "
                              "includes the VAE encoding of every step, which vedit skips)"),
    # Guided sampling is a no-grad call on 2 x frames: per latent pixel, the skip connections
    # (3 x 320 channels) and the widest transformer's GEGLU (2 x 2560 + 1280 + 2 x 320) in
    # 2-byte activations, for both halves of the batch.
    ("edit", "original"): (2 * 2 * (3 * 320 + 2 * 2560 + 1280 + 2 * 320),
                           "first-principles estimate, not measured"),
    ("edit", "vedit"): (2 * 2 * (3 * 320 + 2 * 2560 + 1280 + 2 * 320),
                        "first-principles estimate, not measured"),
}


@dataclass(frozen=True)
class Counts:
    """Parameter counts of the models a recipe keeps on the GPU."""

    unet: int  # the inflated UNet, temporal attention included, LoRA not
    temporal: int  # attn_temp, trained by both recipes (norm_temp stays frozen, as there)
    queries: int  # attn1.to_q and attn2.to_q, which the original trains whole
    lora: int  # vedit's adapters
    vae: int
    text: int


@dataclass(frozen=True)
class Fit:
    """Activation bytes per frame per latent pixel, an overhead in GB, and their source."""

    bytes_per_frame_pixel: float
    overhead_gb: float
    source: str
    calibrated: bool


def _count(module: torch.nn.Module, *needles: str) -> int:
    """Parameters whose names hold one of `needles` (all of them without)."""
    return sum(p.numel() for n, p in module.named_parameters()
               if not needles or any(needle in n for needle in needles))


@lru_cache(maxsize=4)
def parameter_counts(shapes: Shapes = SD15) -> Counts:
    """Count on the meta device: the real architecture, no memory, under a second."""
    meta, dtype = torch.device("meta"), torch.float32
    unet = inflate_unet(build_unet(shapes, meta, dtype))
    plain = _count(unet)
    settings = TuneSettings(prompt="count")
    add_lora(unet, rank=settings.rank, targets=parse_targets([settings.lora_targets]))
    return Counts(
        unet=plain, temporal=_count(unet, ".attn_temp."),
        queries=_count(unet, "attn1.to_q.base_layer", "attn2.to_q.base_layer"),
        lora=_count(unet, ".lora_"), vae=_count(build_vae(shapes, meta, dtype)),
        text=_count(build_text_encoder(shapes, meta, dtype)))


def fixed_gb(stage: str, recipe: str, counts: Counts) -> float:
    """Weights and trained state, in GB: what does not grow with the clip."""
    if stage == "edit":  # everything in half precision; vedit keeps its adapters unmerged
        lora = counts.lora if recipe == "vedit" else 0
        total = 2 * (counts.unet + lora + counts.vae + counts.text)
    elif recipe == "original":  # fp32 UNet; half VAE and text encoder; to_q + attn_temp trained
        total = (4 * counts.unet + 2 * (counts.vae + counts.text)
                 + ADAM_BYTES * (counts.queries + counts.temporal))
    else:  # half UNet, trained weights in fp32; VAE and text encoder moved off the GPU
        total = (2 * counts.unet + 2 * counts.temporal + 4 * counts.lora
                 + ADAM_BYTES * (counts.temporal + counts.lora))
    return total / GIB


def latent_pixels(height: int, width: int, shapes: Shapes = SD15) -> int:
    """Latent pixels of one frame: what activations grow with, with frames."""
    return (height // shapes.vae_scale_factor) * (width // shapes.vae_scale_factor)


def fit_points(stage: str, recipe: str, points: list[tuple[int, int, int, float]],
               source: str, shapes: Shapes = SD15) -> Fit:
    """Least squares of (peak - fixed) against frames x latent pixels; one point fixes the
    slope alone."""
    fixed = fixed_gb(stage, recipe, parameter_counts(shapes))
    xs = [frames * latent_pixels(h, w, shapes) / GIB for frames, h, w, _ in points]
    ys = [peak - fixed for *_, peak in points]
    if len(set(xs)) < 2:
        return Fit(sum(ys) / sum(xs), 0.0, source, True)
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
             / sum((x - mean_x) ** 2 for x in xs))
    return Fit(slope, mean_y - slope * mean_x, source, True)


@lru_cache(maxsize=16)
def constants(stage: str, recipe: str) -> Fit:
    """The fitted constants of a stage and recipe, or its stand-in until it is measured."""
    if (stage, recipe) in MEASURED:
        source, points = MEASURED[(stage, recipe)]
        return fit_points(stage, recipe, points, source)
    slope, source = STAND_INS[(stage, recipe)]
    if slope is None:
        slope = constants(stage, "original").bytes_per_frame_pixel
    return Fit(slope, 0.0, source, False)


def is_calibrated(stage: str, recipe: str) -> bool:
    """Whether the constants come from measurements rather than a stand-in."""
    return constants(stage, recipe).calibrated


def predict_peak_gb(frames: int, height: int, width: int, recipe: str = "vedit", *,
                    stage: str = "tune") -> float:
    """The peak GPU memory (GB, as torch.cuda.max_memory_allocated) of tuning or editing a
    clip of `frames` at `height` x `width` with batch 1, under the recipe's defaults."""
    fit = constants(stage, recipe)
    activations = fit.bytes_per_frame_pixel * frames * latent_pixels(height, width) / GIB
    return fixed_gb(stage, recipe, parameter_counts()) + fit.overhead_gb + activations


def usable_gb(device_total_gb: float) -> float:
    """What torch can allocate on a card of that size: less the context and fragmentation."""
    return device_total_gb * (1 - FRAGMENTATION) - CONTEXT_GB


@dataclass(frozen=True)
class Advice:
    """Whether a run fits the card and, if not, the largest settings that do."""

    predicted_gb: float
    usable_gb: float
    fits: bool
    max_frames: int
    max_side: int
    calibrated: bool

    def lines(self, frames: int, height: int, width: int) -> list[str]:
        """The advice as a dry run would print it."""
        verdict = "fits" if self.fits else "does not fit"
        lines = [f"{frames} frames at {width}x{height}: about {self.predicted_gb:.1f} GB of "
                 f"{self.usable_gb:.1f} GB usable; {verdict}"
                 + ("" if self.calibrated else " (estimate, not yet calibrated)")]
        if not self.fits:
            lines.append(f"fits: --frames {self.max_frames} at this size, or --size "
                         f"{self.max_side} (short side) with {frames} frames")
        return lines


def advise(frames: int, height: int, width: int, device_total_gb: float,
           recipe: str = "vedit", *, stage: str = "tune") -> Advice:
    """Predict the peak and, where it is over the card, which frames or size would fit."""
    usable = usable_gb(device_total_gb)
    predicted = predict_peak_gb(frames, height, width, recipe, stage=stage)
    max_frames = frames
    while max_frames > 1 and predict_peak_gb(max_frames, height, width, recipe,
                                             stage=stage) > usable:
        max_frames -= 1
    scale, short = 1.0, min(height, width)
    while short * scale > 64 and predict_peak_gb(
            frames, _round64(height * scale), _round64(width * scale), recipe,
            stage=stage) > usable:
        scale -= 1 / 16
    return Advice(predicted, usable, predicted <= usable, max_frames,
                  _round64(short * scale), is_calibrated(stage, recipe))


def _round64(side: float) -> int:
    """Down to a multiple of 64, the UNet's size unit, at least 64."""
    return max(64, int(side) // 64 * 64)


def measured_points(results: dict) -> dict[tuple[str, str], list[tuple[int, int, int, float]]]:
    """(frames, height, width, peak_gb) per (stage, recipe) from a run.py results.json."""
    width, height = (int(side) for side in results["meta"]["size"].split("x"))
    points: dict[tuple[str, str], list[tuple[int, int, int, float]]] = {}
    for result in results["results"]:
        stage = {"tune": "tune", "edit": "edit"}.get(result["kind"])
        peak = result["metrics"].get("peak_gb")
        if stage and peak:
            points.setdefault((stage, result["recipe"]), []).append(
                (result["frames"], height, width, round(peak, 2)))
    return points


def main(argv: list[str] | None = None) -> None:
    """`predict` a peak (and advice for a card), or `fit`: MEASURED entries from results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="the expected peak and whether it fits")
    predict.add_argument("--frames", type=int, required=True)
    predict.add_argument("--size", default="512", help="512 or WIDTHxHEIGHT")
    predict.add_argument("--recipe", choices=RECIPES, default="vedit")
    predict.add_argument("--stage", choices=STAGES, default="tune")
    predict.add_argument("--device-total-gb", type=float, default=None)
    fit = commands.add_parser("fit", help="MEASURED entries from a run.py results.json")
    fit.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.command == "fit":
        data = json.loads(args.results.read_text())
        source = f"{data['meta']['device']}, torch {data['meta']['torch']}, {data['meta']['date']}"
        for key, points in measured_points(data).items():
            print(f"    {key!r}: ({source!r},\n        {points!r}),")
        return
    width, _, height = args.size.lower().partition("x")
    height, width = int(height or width), int(width)
    if args.device_total_gb is None:
        peak = predict_peak_gb(args.frames, height, width, args.recipe, stage=args.stage)
        print(f"{peak:.1f} GB" + ("" if is_calibrated(args.stage, args.recipe)
                                  else " (estimate, not yet calibrated)"))
        return
    advice = advise(args.frames, height, width, args.device_total_gb, args.recipe,
                    stage=args.stage)
    print("\n".join(advice.lines(args.frames, height, width)))


if __name__ == "__main__":
    sys.exit(main())
