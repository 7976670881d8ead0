"""FLOPs of a tuning step, counted by torch's FlopCounterMode on the meta device.

The recipes are built as recipes.py builds them for a run, but on the meta device (shapes and
dtypes, no data, no memory), so any shapes count on any machine in seconds, with no GPU:

- `forward`: the UNet's forward;
- `model`: the UNet's forward and backward, counted once (no recomputation): the work a step
  must do, the numerator of model FLOP utilisation;
- `hardware`: the step as a GPU runs it: with gradient checkpointing its recomputed
  forwards, for `original` the VAE encoding of the clip and the text encoder too, and attention
  in a fused kernel (flash, memory-efficient or cuDNN), whose backward computes the attention
  scores again (five products where the plain path has four).

FlopCounterMode counts matrix products, convolutions and attention (the ops that cost), not
the element-wise rest. On the meta device attention takes the plain path (two products
forward, four backward), which is the model count's convention; the hardware count routes it
to the memory-efficient kernel's op instead, which torch counts by the same formula as the
flash and cuDNN kernels.

    python benchmarks/flops.py                      # SD 1.5 shapes, 512 px, 8 frames
    python benchmarks/flops.py --frames 8,24 --json --out flops.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from recipes import META, RECIPES, Bench, build_tuning, prompt_embeds
from shapes import Shapes, shapes_for
from torch.utils.flop_counter import FlopCounterMode

from vedit.project import write_text_atomic

TERA = 1e12


def count(work: Callable[[], object]) -> int:
    """FLOPs of one call of `work`, as torch counts them."""
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False) -> torch.Tensor:
    """`scaled_dot_product_attention` through the memory-efficient kernel's op, as on a GPU."""
    if enable_gqa:
        raise ValueError("grouped-query attention is not counted")
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, torch.is_grad_enabled(), dropout_p, is_causal,
        scale=scale)[0]


@contextmanager
def fused_attention() -> Iterator[None]:
    """Route every `F.scaled_dot_product_attention` call (diffusers', transformers' and vedit's
    processors look it up at call time) to the fused kernel's op while counting. Patched on
    the module, not by a torch function mode, so that checkpointing's replays see it too."""
    plain = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


def step_flops(recipe: str, frames: int, shapes: Shapes, height: int, width: int, *,
               inflated: bool = True, checkpointing: bool = True) -> dict[str, int]:
    """`forward`, `model` and `hardware` FLOPs of one tuning step of `recipe` on a clip of
    `frames`; `checkpointing` as the step runs (both recipes turn it on on a GPU)."""
    bench = Bench(shapes, META, height, width)
    tuning = build_tuning(recipe, frames, bench, inflated=inflated, mixed_precision="no",
                          checkpointing=checkpointing, fused=False)
    with fused_attention():
        hardware = count(lambda: tuning.loss().backward())
    tuning.unet.disable_gradient_checkpointing()
    sample = torch.zeros(bench.latent_shape(frames), device=META)
    timestep = torch.tensor([500], device=META)
    embeds = prompt_embeds(bench, torch.float32)
    with FlopCounterMode(display=False) as counter:
        prediction = tuning.unet(sample, timestep, embeds)
        forward = counter.get_total_flops()
        F.mse_loss(prediction, sample).backward()
    tuning.release()
    return {"forward": forward, "model": counter.get_total_flops(), "hardware": hardware}


def main(argv: list[str] | None = None) -> int:
    """Count both recipes, inflated and 2D, for each frame count, in the order given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="vedit.tiny_model's shapes")
    parser.add_argument("--frames", default="8", help="frame counts, e.g. 8,24")
    parser.add_argument("--size", type=int, default=None, help="square side (default native)")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="count the step without gradient checkpointing (vedit on a CPU)")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the JSON list here after every count (run.py "
                             "--flops-from reads it)")
    args = parser.parse_args(argv)
    shapes = shapes_for(args.tiny)
    side = args.size or shapes.resolution
    rows = []
    for frames in (int(f) for f in args.frames.split(",") if f.strip()):
        for inflated in (True, False):
            for recipe in RECIPES:
                flops = step_flops(recipe, frames, shapes, side, side, inflated=inflated,
                                   checkpointing=args.checkpointing)
                rows.append({"recipe": recipe, "unet": "inflated" if inflated else "2D",
                             "frames": frames, "size": side,
                             "checkpointing": args.checkpointing,
                             **{f"{k}_tflop": v / TERA for k, v in flops.items()}})
                if args.out is not None:
                    write_text_atomic(args.out, json.dumps(rows, indent=2) + "\n")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(markdown(rows, shapes.name, side, args.checkpointing))
    return 0


def markdown(rows: list[dict[str, Any]], shapes: str, side: int, checkpointing: bool) -> str:
    """The counts as a table, TFLOP per step."""
    lines = [f"{shapes} shapes, {side}x{side}, batch 1, gradient checkpointing "
             f"{'on' if checkpointing else 'off'}; TFLOP per step", "",
             "| recipe | UNet | frames | forward | model (fwd+bwd once) | hardware (as run) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {row['recipe']} | {row['unet']} | {row['frames']} | "
              f"{row['forward_tflop']:.2f} | {row['model_tflop']:.2f} | "
              f"{row['hardware_tflop']:.2f} |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
