"""The two tuning recipes the benchmarks compare, and the original's editing, over vedit's UNet.

`original` is Tune-A-Video's training and editing recipe (its train_tuneavideo.py and
pipeline), rebuilt with vedit's code: UNet weights fp32 under fp16 autocast (accelerate, with
its gradient scaler), gradient checkpointing, the clip re-encoded by the VAE and the prompt by
the text encoder at every step, `attn1.to_q`, `attn2.to_q` and all of `attn_temp` trained
whole, AdamW at 3e-5 over `unet.parameters()`; editing in fp16 with the latents on the GPU, the
whole clip decoded in one VAE call and one video written.

`vedit` is tune.py's own `build_run` and `train_step` on cached latents: frozen weights in the
compute dtype (bf16 on a GPU), trained ones in fp32, LoRA rank 16 on the query projections plus
`attn_temp`, gradient checkpointing on a GPU, fused AdamW, bf16 autocast through accelerate.
vedit's editing is not rebuilt here: stages.py times `vedit.edit.edit` itself.

On a CPU both run in fp32 without autocast (vedit's own CPU default), and vedit without
checkpointing; `Tuning.levers` says what each recipe does, so a table lists every difference.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from shapes import (
    Shapes,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    prompt_ids,
)
from torch import nn

from vedit.edit import decode_latents
from vedit.inflate import FrameContext, InflatedUNet, inflate_unet
from vedit.latents import FrameLatents
from vedit.sampler import ddim_invert, ddim_sample
from vedit.settings import TuneSettings
from vedit.tune import (
    ADAM_WEIGHT_DECAY,
    MAX_GRAD_NORM,
    TrainingRun,
    build_run,
    mixed_precision_for,
    train_step,
    training_loss,
    weight_dtype,
)
from vedit.video import write_mp4

ORIGINAL, VEDIT = "original", "vedit"
RECIPES = (ORIGINAL, VEDIT)
#: Tune-A-Video's `trainable_modules`: module names ending so are trained whole.
ORIGINAL_TRAINABLE = ("attn1.to_q", "attn2.to_q", "attn_temp")
ORIGINAL_LR = 3e-5
EDIT_FPS = 8  # the edited clip's frame rate; only the mp4's timestamps depend on it
LATENT_STD = 0.1  # a plausible VAE posterior spread for the cached latents; costs nothing
META = torch.device("meta")


@dataclass(frozen=True)
class Bench:
    """Where and at which size the recipes run (`meta`: shapes only, to count FLOPs)."""

    shapes: Shapes
    device: torch.device
    height: int
    width: int

    @property
    def cuda(self) -> bool:
        """Whether the recipes run on a GPU (their GPU defaults apply)."""
        return self.device.type == "cuda"

    def latent_shape(self, frames: int, batch: int = 1) -> tuple[int, ...]:
        """`(b, c, f, h, w)` of a clip's latents at this size."""
        factor = self.shapes.vae_scale_factor
        return (batch, self.shapes.unet["in_channels"], frames, self.height // factor,
                self.width // factor)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU, so that wall-clock time covers the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def frames_as_batch(unet2d: nn.Module) -> InflatedUNet:
    """The 2D UNet run on a clip as a batch of frames: vedit's own video wrapper around a UNet
    left uninflated (no sparse-causal or temporal attention, per-frame norms). The inflated
    step's time over this one's is the cost of inflation."""
    return InflatedUNet(unet2d, FrameContext())


def video_unet(unet2d: nn.Module, *, inflated: bool, seed: int) -> InflatedUNet:
    """Inflate the 2D UNet (new layers seeded, as `vedit tune --seed`) or leave it 2D."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (inflate_unet if inflated else frames_as_batch)(unet2d)


def reset_accelerate() -> None:
    """A fresh accelerate state, as a new process has (its tests reset it the same way)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def fresh_accelerator(mixed_precision: str, bench: Bench) -> Any:
    """A new Accelerator. accelerate keeps one process-wide state, which refuses a second
    mixed-precision mode and which every Accelerator reads (fp16 gradients are unscaled only
    while it says fp16), so each recipe starts from a reset one, as accelerate's own tests
    do. On the meta device nothing is moved (there is no data to move)."""
    from accelerate import Accelerator

    reset_accelerate()
    return Accelerator(mixed_precision=mixed_precision, cpu=not bench.cuda,
                       device_placement=bench.device != META)


@dataclass(frozen=True)
class StepCheck:
    """One optimizer step's loss and whether its update was applied (an fp16 gradient scaler
    skips the update of a step whose gradients overflowed)."""

    loss: float
    applied: bool

    @property
    def ok(self) -> bool:
        return math.isfinite(self.loss) and self.applied


@dataclass
class Tuning:
    """One recipe's tuning state, ready for `step()`; `levers` says how it trains."""

    recipe: str
    unet: InflatedUNet
    optimizer: Any  # accelerate's wrapper of the torch optimizer
    accelerator: Any
    clipped: list[nn.Parameter]
    loss: Callable[[], torch.Tensor]
    bench: Bench
    precision: str  # accelerate's mixed precision for this recipe
    levers: dict[str, str]
    run: TrainingRun | None = None  # vedit's own training state: its step is `train_step`

    @property
    def checkpointing(self) -> bool:
        return bool(self.unet.unet.is_gradient_checkpointing)

    def activate(self) -> None:
        """Make accelerate's process-wide state this recipe's again (another recipe built
        since may have changed its mixed precision): call before this recipe's steps."""
        fresh_accelerator(self.precision, self.bench)

    def step(self) -> StepCheck:
        """One optimizer step as both training loops do it, reading the loss (a sync point,
        as both loops read it every step)."""
        loss = train_step(self.run).item() if self.run is not None else self.original_step()
        return StepCheck(loss, not self.optimizer.step_was_skipped)

    def original_step(self) -> float:
        """The original loop's step: accumulate, backward, clip, step, zero."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.unet):
            loss = self.loss()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.clipped, MAX_GRAD_NORM)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    def release(self) -> None:
        """Drop the accelerator's references, so that the memory can be freed."""
        self.accelerator.free_memory()


def build_tuning(recipe: str, frames: int, bench: Bench, *, inflated: bool = True,
                 mixed_precision: str | None = None, checkpointing: bool | None = None,
                 fused: bool | None = None) -> Tuning:
    """The recipe's tuning state for a clip of `frames`; the keywords override its defaults
    (the equivalence tests set both recipes to fp32, or one lever on and off)."""
    build = {ORIGINAL: original_tuning, VEDIT: vedit_tuning}[recipe]
    tuning = build(frames, bench, inflated=inflated, mixed_precision=mixed_precision,
                   checkpointing=checkpointing, fused=fused)
    tuning.levers |= {
        "autocast": {"no": "none"}.get(tuning.precision, tuning.precision),
        "gradient checkpointing": "on" if tuning.checkpointing else "off",
        "optimizer": ("fused " if tuning.optimizer.optimizer.defaults.get("fused") else "")
        + "AdamW",
    }
    return tuning


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` as `bf16`."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch."))


def original_tuning(frames: int, bench: Bench, *, inflated: bool,
                    mixed_precision: str | None, checkpointing: bool | None,
                    fused: bool | None) -> Tuning:
    """Tune-A-Video's train_tuneavideo.py, step for step."""
    precision = mixed_precision or ("fp16" if bench.cuda else "no")
    accelerator = fresh_accelerator(precision, bench)
    half = weight_dtype(precision)  # its VAE and text encoder run in the autocast dtype
    unet = video_unet(build_unet(bench.shapes, bench.device, torch.float32), inflated=inflated,
                      seed=TuneSettings.seed)
    for name, module in unet.unet.named_modules():
        if name.endswith(ORIGINAL_TRAINABLE):
            module.requires_grad_(True)
    if checkpointing is None or checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=ORIGINAL_LR,
                                  weight_decay=ADAM_WEIGHT_DECAY, fused=bool(fused))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    vae = build_vae(bench.shapes, bench.device, half)
    text_encoder = build_text_encoder(bench.shapes, bench.device, half)
    scheduler = build_scheduler()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand((frames, 3, bench.height, bench.width), generator=generator)
    pixels = (pixels * 2 - 1).to(bench.device, half)
    ids = prompt_ids(bench.shapes, bench.device)
    scale = bench.shapes.vae["scaling_factor"]

    def loss() -> torch.Tensor:
        """Encode the clip and the prompt, noise it, predict, compare: the original's step."""
        latents = vae.encode(pixels).latent_dist.sample()
        latents = rearrange(latents, "(b f) c h w -> b c f h w", f=frames) * scale
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,),
                                  device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prompt = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, prompt)
        return F.mse_loss(prediction.float(), noise.float())

    levers = {"weights": f"UNet fp32; VAE and text encoder {dtype_name(half)}",
              "the clip each step": "encoded by the VAE; the prompt by the text encoder",
              "trained": "attn1.to_q, attn2.to_q and attn_temp, whole"}
    return Tuning(ORIGINAL, unet, optimizer, accelerator, list(unet.parameters()), loss, bench,
                  precision, levers)


def vedit_tuning(frames: int, bench: Bench, *, inflated: bool, mixed_precision: str | None,
                 checkpointing: bool | None, fused: bool | None) -> Tuning:
    """vedit tune's own `build_run` and `train_step`, on cached latents of random values; the
    2D row passes `frames_as_batch` for the inflation, so every other lever stays vedit's."""
    settings = TuneSettings(prompt="benchmark", gradient_checkpointing=checkpointing)
    precision = mixed_precision or mixed_precision_for(settings.mixed_precision, bench.device)
    accelerator = fresh_accelerator(precision, bench)
    dtype = weight_dtype(precision)
    unet2d = build_unet(bench.shapes, bench.device, dtype)
    latents, embeds = cached_latents(frames, bench), prompt_embeds(bench, dtype)
    run = build_run(unet2d, build_scheduler(), "epsilon", latents, embeds, settings, accelerator,
                    fused=fused, inflate=inflate_unet if inflated else frames_as_batch)
    levers = {"weights": f"frozen {dtype_name(dtype)}, trained fp32",
              "the clip each step": "cached latents sampled; the prompt cached",
              "trained": f"LoRA rank {settings.rank} on {settings.lora_targets}; attn_temp whole"}
    return Tuning(VEDIT, run.unet, run.optimizer, accelerator, run.trained,
                  lambda: training_loss(run, run.generator, settings.batch), bench, precision,
                  levers, run=run)


def cached_latents(frames: int, bench: Bench) -> FrameLatents:
    """What latents.py caches for a clip: the encoder's mean and std, here random."""
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(bench.latent_shape(frames), generator=generator)
    std = torch.full_like(mean, LATENT_STD)
    return FrameLatents(mean.to(bench.device), std.to(bench.device), "random", Path("latents"),
                        True)


def prompt_embeds(bench: Bench, dtype: torch.dtype, batch: int = 1) -> torch.Tensor:
    """Text-encoder states `(batch, 77, d)` of a cached prompt, random."""
    generator = torch.Generator().manual_seed(2)
    shape = (batch, bench.shapes.text_tokens, bench.shapes.unet["cross_attention_dim"])
    return torch.randn(shape, generator=generator).to(bench.device, dtype)


# -- the original's editing --------------------------------------------------------------------


@dataclass
class OriginalEditing:
    """The original pipeline's models for editing a clip, as it holds them: fp16 on the GPU,
    its VAE kept in fp16 (the diffusers it ran on never upcast), the latents on the GPU."""

    unet: InflatedUNet
    vae: nn.Module
    text_encoder: nn.Module
    scheduler: Any
    latents: torch.Tensor
    ids: torch.Tensor

    @property
    def levers(self) -> dict[str, str]:
        return {"weights": dtype_name(self.unet.dtype) + ", no LoRA",
                "clip latents": "on the GPU" if self.latents.is_cuda else "on the CPU",
                "VAE decode": "the whole clip in one call",
                "files written": "one mp4; the inversion (fp16)"}


def build_original_editing(frames: int, bench: Bench) -> OriginalEditing:
    """Its models, with random weights, and the clip's latents."""
    dtype = torch.float16 if bench.cuda else torch.float32
    unet = video_unet(build_unet(bench.shapes, bench.device, dtype), inflated=True,
                      seed=TuneSettings.seed)
    unet = unet.eval().requires_grad_(False)
    vae = build_vae(bench.shapes, bench.device, dtype, force_upcast=False)
    text_encoder = build_text_encoder(bench.shapes, bench.device, dtype)
    latents = cached_latents(frames, bench).mean
    return OriginalEditing(unet, vae, text_encoder, build_scheduler(), latents,
                           prompt_ids(bench.shapes, bench.device))


class Stopwatch:
    """Named sections of wall-clock time, each ended by a device sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Time the block, the device synchronised at both ends; repeats add up."""
        synchronize(self.device)
        started = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


@torch.no_grad()
def original_edit(editing: OriginalEditing, steps: int, guidance: float, folder: Path,
                  cached_inversion: Path | None = None) -> dict[str, float]:
    """One edit as the original pipeline does it: encode prompts, invert (or load the cached
    inversion), sample with guidance, decode, write the mp4. Returns the seconds of each
    section; the inversion is saved (fp16, its weight dtype) to `folder/inversion.safetensors`
    for a later cached run."""
    watch = Stopwatch(editing.latents.device)
    with watch.section("prompts"):
        cond = editing.text_encoder(editing.ids)[0]
        uncond = editing.text_encoder(editing.ids.flip(-1))[0]
    with watch.section("invert"):
        if cached_inversion is None:
            noise = ddim_invert(editing.unet, editing.scheduler, editing.latents, uncond,
                                steps)
            save_file({"noise": noise.to(editing.unet.dtype).cpu()},
                      str(folder / "inversion.safetensors"))
        else:
            noise = load_file(str(cached_inversion))["noise"].to(editing.latents.device)
    with watch.section("sample"):
        sample = ddim_sample(editing.unet, editing.scheduler, noise.float(), cond, uncond,
                             guidance, steps)
    with watch.section("decode"):
        frames = decode_latents(editing.vae, sample[0], slice_size=sample.shape[2])
    with watch.section("write"):
        times = [index / EDIT_FPS for index in range(len(frames))]
        write_mp4(folder / "video.mp4", list(frames), times, 1 / EDIT_FPS)
    return watch.seconds
