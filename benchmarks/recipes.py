"""The two recipes the benchmarks compare, both over vedit's own inflated UNet.

`original` is Tune-A-Video's training and editing recipe (its train_tuneavideo.py and
pipeline), rebuilt with vedit's code: UNet weights fp32 under fp16 autocast (accelerate, with
its gradient scaler), gradient checkpointing, the clip re-encoded by the VAE and the prompt by
the text encoder at every step, `attn1.to_q`, `attn2.to_q` and all of `attn_temp` trained
whole, AdamW at 3e-5 over `unet.parameters()`; editing in fp16 with the whole clip decoded in
one VAE call.

`vedit` is what `vedit tune` and `vedit edit` do by default (tune.py `_prepare`, edit.py):
frozen weights in the compute dtype (bf16 on a GPU), trained ones in fp32, LoRA rank 16 on
the query projections plus `attn_temp`, latents encoded once (a cached mean and std, sampled
each step, never the VAE), gradient checkpointing on a GPU, fused AdamW, bf16 autocast through
accelerate; editing in bf16 with LoRA adapters, decoding a slice of frames at a time.

On a CPU both run in fp32 without autocast (vedit's own CPU default); only the levers that
are not about precision differ there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
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

from vedit.edit import DECODE_SLICE, decode_latents
from vedit.inflate import inflate_unet, per_frame_timestep
from vedit.latents import FrameLatents
from vedit.lora import add_lora, trainable_parameters
from vedit.models import default_dtype
from vedit.sampler import ddim_invert, ddim_sample
from vedit.settings import TuneSettings, parse_targets
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


@dataclass(frozen=True)
class Bench:
    """Where and at which size the recipes run."""

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


class PlainUNet(nn.Module):
    """The 2D UNet run on a clip as a batch of frames (no inflation): the inflated UNet's step
    time over this one's is the cost of inflation."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype, as `InflatedUNet.dtype` (vedit's `predict` reads it)."""
        return self.unet.dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Same call as `InflatedUNet`: clips `(b, c, f, h, w)`, prompts `(b, n, d)`."""
        batch, _, num_frames = sample.shape[:3]
        frames = rearrange(sample, "b c f h w -> (b f) c h w")
        prompts = encoder_hidden_states.repeat_interleave(num_frames, dim=0)
        timestep = per_frame_timestep(timestep, batch, num_frames)
        prediction = self.unet(frames, timestep, prompts, return_dict=False)[0]
        return rearrange(prediction, "(b f) c h w -> b c f h w", f=num_frames)

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' per-block checkpointing; no frame context to pin, unlike inflated."""
        self.unet.enable_gradient_checkpointing()


def video_unet(unet2d: nn.Module, *, inflated: bool, seed: int) -> nn.Module:
    """Inflate the 2D UNet (new layers seeded, as `vedit tune --seed`) or wrap it plainly."""
    if not inflated:
        return PlainUNet(unet2d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return inflate_unet(unet2d)


def fresh_accelerator(mixed_precision: str, bench: Bench) -> Any:
    """A new Accelerator: accelerate keeps one process-wide state, which refuses a second
    mixed-precision mode, so each recipe starts from a reset one (as accelerate's own tests do)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=not bench.cuda)


@dataclass
class Tuning:
    """One recipe's tuning state, ready for `step()`."""

    recipe: str
    unet: nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Any
    clipped: list[nn.Parameter]
    loss: Callable[[], torch.Tensor]
    run: TrainingRun | None = None  # vedit's own training state: its step is `train_step`

    def step(self) -> float:
        """One optimizer step as both training loops do it; returns the loss (a sync point, as
        both loops read it every step)."""
        if self.run is not None:
            return train_step(self.run).item()
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
        """Drop the accelerator's references, so the next recipe measures its own memory."""
        self.accelerator.free_memory()


def build_tuning(recipe: str, frames: int, bench: Bench, *, inflated: bool = True,
                 mixed_precision: str | None = None, checkpointing: bool | None = None,
                 fused: bool | None = None) -> Tuning:
    """The recipe's tuning state for a clip of `frames`; the keywords override its defaults
    (the equivalence tests set both recipes to fp32, or one lever on and off)."""
    build = {ORIGINAL: original_tuning, VEDIT: vedit_tuning}[recipe]
    return build(frames, bench, inflated=inflated, mixed_precision=mixed_precision,
                 checkpointing=checkpointing, fused=fused)


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

    return Tuning(ORIGINAL, unet, optimizer, accelerator, list(unet.parameters()), loss)


def vedit_tuning(frames: int, bench: Bench, *, inflated: bool, mixed_precision: str | None,
                 checkpointing: bool | None, fused: bool | None) -> Tuning:
    """vedit tune's own `build_run` and `train_step`, on cached latents of random values; the
    2D row (no inflation) builds the same levers around the plain UNet by hand."""
    settings = TuneSettings(prompt="benchmark", gradient_checkpointing=checkpointing)
    precision = mixed_precision or mixed_precision_for(settings.mixed_precision, bench.device)
    accelerator = fresh_accelerator(precision, bench)
    dtype = weight_dtype(precision)
    unet2d = build_unet(bench.shapes, bench.device, dtype)
    latents, embeds = cached_latents(frames, bench), prompt_embeds(bench, dtype)
    if inflated:
        run = build_run(unet2d, build_scheduler(), "epsilon", latents, embeds, settings,
                        accelerator, fused=fused)
        return Tuning(VEDIT, run.unet, run.optimizer, accelerator, run.trained,
                      lambda: training_loss(run, run.generator, settings.batch), run=run)
    unet = video_unet(unet2d, inflated=False, seed=settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        add_lora(unet, rank=settings.rank, targets=parse_targets([settings.lora_targets]))
    params = trainable_parameters(unet)
    for param in params:
        param.data = param.data.float()
    if bench.cuda if checkpointing is None else checkpointing:  # tune's default: on a GPU
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(param_groups(unet, settings), weight_decay=ADAM_WEIGHT_DECAY,
                                  fused=bench.cuda if fused is None else fused)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    run = SimpleNamespace(unet=unet, latents=latents, scheduler=build_scheduler(),
                          prediction_type="epsilon", prompt_embeds=embeds)
    generator = torch.Generator(bench.device).manual_seed(settings.seed)
    return Tuning(VEDIT, unet, optimizer, accelerator, params,
                  lambda: training_loss(run, generator, settings.batch))


def param_groups(unet: nn.Module, settings: TuneSettings) -> list[dict[str, Any]]:
    """As tune.py: the temporal attention at `lr`, the LoRA adapters at `lora_lr`."""
    named = [(n, p) for n, p in unet.unet.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if ".attn_temp." in n], "lr": settings.lr},
              {"params": [p for n, p in named if ".lora_" in n], "lr": settings.lora_lr}]
    return [group for group in groups if group["params"]]


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


@dataclass
class Editing:
    """One recipe's models for editing a clip, as `vedit edit` (or the original) holds them."""

    recipe: str
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    scheduler: Any
    latents: torch.Tensor
    ids: torch.Tensor
    decode_slice: int


def build_editing(recipe: str, frames: int, bench: Bench) -> Editing:
    """vedit: bf16, LoRA adapters unmerged, decode `DECODE_SLICE` frames at a time; original:
    fp16, its VAE kept in fp16 (the diffusers it ran on never upcast), the clip decoded in one
    call."""
    original = recipe == ORIGINAL
    dtype = torch.float16 if original and bench.cuda else default_dtype(bench.device)
    unet = video_unet(build_unet(bench.shapes, bench.device, dtype), inflated=True,
                      seed=TuneSettings.seed)
    if not original:
        settings = TuneSettings(prompt="benchmark")
        add_lora(unet, rank=settings.rank, targets=parse_targets([settings.lora_targets]))
    unet = unet.to(bench.device, dtype).eval().requires_grad_(False)
    vae = build_vae(bench.shapes, bench.device, dtype, force_upcast=not original)
    text_encoder = build_text_encoder(bench.shapes, bench.device, dtype)
    latents = cached_latents(frames, bench).mean
    return Editing(recipe, unet, vae, text_encoder, build_scheduler(), latents,
                   prompt_ids(bench.shapes, bench.device),
                   frames if original else DECODE_SLICE)


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
def edit_clip(editing: Editing, steps: int, guidance: float, folder: Path,
              cached_inversion: Path | None = None) -> dict[str, float]:
    """One edit end to end: encode prompts, invert (or load the cached inversion), sample with
    guidance, decode, write the mp4. Returns the seconds of each section; the inversion is
    saved to `folder/inversion.safetensors` for a later cached run."""
    watch = Stopwatch(editing.latents.device)
    with watch.section("prompts"):
        cond = editing.text_encoder(editing.ids)[0]
        uncond = editing.text_encoder(editing.ids.flip(-1))[0]
    if cached_inversion is None:
        with watch.section("invert"):
            noise = ddim_invert(editing.unet, editing.scheduler, editing.latents, uncond,
                                steps)
            save_file({"noise": noise.float().cpu()}, str(folder / "inversion.safetensors"))
    else:
        with watch.section("invert"):
            noise = load_file(str(cached_inversion))["noise"].to(editing.latents.device)
    with watch.section("sample"):
        sample = ddim_sample(editing.unet, editing.scheduler, noise, cond, uncond, guidance,
                             steps)
    with watch.section("decode"):
        frames = decode_latents(editing.vae, sample[0], slice_size=editing.decode_slice)
    with watch.section("write"):
        times = [index / EDIT_FPS for index in range(len(frames))]
        write_mp4(folder / "video.mp4", list(frames), times, 1 / EDIT_FPS)
    return watch.seconds


@torch.no_grad()
def warm_up_editing(editing: Editing) -> None:
    """First calls load kernels and pick algorithms: one UNet call of each batch, one decode."""
    embeds = editing.text_encoder(editing.ids)[0]
    sample = editing.latents.to(editing.unet.dtype)
    timestep = torch.tensor(500, device=sample.device)
    editing.unet(sample, timestep, embeds.to(sample.dtype))
    editing.unet(torch.cat([sample, sample]), timestep, torch.cat([embeds, embeds]))
    decode_latents(editing.vae, editing.latents[0, :, :1], slice_size=1)

