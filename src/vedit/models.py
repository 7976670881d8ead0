"""The base Stable Diffusion model: find it on disk, load its components.

A model is named by a hub repo id (kept in the standard Hugging Face cache), a local diffusers
folder, or an original single-file `.safetensors` checkpoint (converted once by
`vedit.single_file`, then used like a folder). Everything here reads local files only, so a stage
never hangs on a download; `vedit.hub` is what fetches. Weights are read from safetensors only:
no pickle, no remote code.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vedit.errors import BadInputError, ModelNotFoundError
from vedit.model_files import (
    DEFAULT_MODEL,
    ModelSource,
    cached_snapshot,
    hub_cache_dir,
    inspect_model_folder,
    model_fingerprint,
    read_json,
)
from vedit.progress import Reporter, quiet_library_progress
from vedit.settings import SDXL_DEFAULT_FRAMES, ExtractSettings
from vedit.single_file import resolve_single_file

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, ModelMixin, UNet2DConditionModel
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        PreTrainedModel,
    )

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class Components:
    """The loaded components of a base model and the facts stages need about it (an SDXL base
    has a second text encoder and tokenizer)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    prediction_type: str
    vae_scale_factor: int
    native_resolution: int
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    #: SDXL: the unconditional branch is all zeros rather than the empty prompt's states.
    force_zeros_for_empty_prompt: bool = False
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = model_fingerprint(self.source)

    @property
    def model_id(self) -> str:
        return self.source.name

    @property
    def commit_hash(self) -> str | None:
        return self.source.commit_hash


# --- resolving a model spec to a local folder ------------------------------------------------


def resolve_model(spec: str | Path = DEFAULT_MODEL, *, revision: str | None = None,
                  variant: str | None = None, reporter: Reporter | None = None,
                  configs_only: bool = False) -> ModelSource:
    """Find `spec` on disk: a cached hub repo, a diffusers folder, or a single-file checkpoint
    (converted on first use when configs for it are cached). Raises if it is not usable.

    `configs_only`: a folder or cached repo without weights will do (`vedit fetch-models
    --configs-only`), for what needs the model's shapes only (the memory prediction)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(str(path.resolve()), "folder", path.resolve(),
                           inspect_model_folder(path, variant=variant,
                                                configs_only=configs_only))
    if path.is_file():
        return resolve_single_file(path.resolve(), variant=variant, reporter=reporter)
    repo_id = as_repo_id(str(spec))
    return _resolve_cached_repo(repo_id, revision=revision, variant=variant,
                                configs_only=configs_only)


def as_repo_id(spec: str) -> str:
    """`spec` if it can be a hub repo id; a missing path is a missing model, a malformed id
    bad input."""
    if spec.endswith((".safetensors", ".ckpt")) or spec.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"The model {spec} does not exist.",
                                 "Check the path, or give a hub id (vedit fetch-models --list).")
    if spec.count("/") > 1 or not _REPO_ID.match(spec):
        raise BadInputError(f"{spec!r} is neither a folder, a .safetensors file nor a hub id.",
                            "Give a hub id like CompVis/stable-diffusion-v1-4, a diffusers folder "
                            "or a .safetensors checkpoint.")
    return spec


def _resolve_cached_repo(repo_id: str, *, revision: str | None, variant: str | None,
                         configs_only: bool = False) -> ModelSource:
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is None:
        raise ModelNotFoundError(
            f"{repo_id} is not in the Hugging Face cache ({hub_cache_dir()}).",
            f"Run `vedit fetch-models {repo_id}` first (with network; the cache can then be "
            "copied to an offline machine).")
    try:
        components = inspect_model_folder(snapshot, variant=variant, configs_only=configs_only)
    except BadInputError as error:
        raise ModelNotFoundError(f"The cached copy of {repo_id} is incomplete: {error.message}",
                                 f"Run `vedit fetch-models {repo_id}` to finish it.") from None
    return ModelSource(repo_id, "hub", snapshot, components, revision=revision,
                       commit_hash=snapshot.name)


# --- loading ---------------------------------------------------------------------------------


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 where the GPU supports it, else fp16; fp16 on other GPUs."""
    import torch

    kind = torch.device(device).type
    if kind == "cpu":
        return torch.float32
    if kind == "cuda":
        # Emulated bf16 (pre-Ampere GPUs) is slow: those get fp16.
        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.float16


def native_bf16() -> bool:
    """Whether the GPU runs bf16 natively (emulated bf16 on older GPUs is slow: use fp16)."""
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no emulation and no argument
        return bool(torch.cuda.is_bf16_supported())


def load_components(model_spec: str | Path | ModelSource = DEFAULT_MODEL, *,
                    device: str | torch.device,
                    dtype: torch.dtype | None = None, revision: str | None = None,
                    variant: str | None = None, reporter: Reporter | None = None
                    ) -> Components:
    """Load the UNet, VAE, text encoder(s), tokenizer(s) and a DDIM scheduler of a base model
    from local files, frozen and in eval mode, on `device` in `dtype` (default:
    `default_dtype`). `model_spec` is resolved first (`resolve_model`), unless it is a resolved
    `ModelSource`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from vedit.sampler import ddim_scheduler

    reporter = reporter or Reporter()
    source = (model_spec if isinstance(model_spec, ModelSource)
              else resolve_model(model_spec, revision=revision, variant=variant, reporter=reporter))
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    folder = str(source.path)
    weighted: list[tuple[str, type[ModelMixin | PreTrainedModel]]] = [
        ("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)]
    tokenizers = ["tokenizer"]
    if source.family == "sdxl":
        weighted.append(("text_encoder_2", CLIPTextModelWithProjection))
        tokenizers.append("tokenizer_2")
    loading = reporter.task(f"Loading {source.name}", total=len(source.components))
    with quiet_library_progress(), loading as task:
        models = {}
        for name, cls in weighted:
            models[name] = cls.from_pretrained(folder, subfolder=name, torch_dtype=dtype,
                                               use_safetensors=True, local_files_only=True,
                                               variant=source.components[name].variant)
            models[name].to(device).eval().requires_grad_(False)
            task.advance()
        loaded = {name: CLIPTokenizer.from_pretrained(folder, subfolder=name,
                                                      local_files_only=True)
                  for name in tokenizers}
        scheduler = ddim_scheduler(source.path)
        task.advance(len(tokenizers) + 1)
    vae_scale_factor = 2 ** (len(models["vae"].config.block_out_channels) - 1)
    index = read_json(source.path / "model_index.json")
    return Components(
        unet=models["unet"], vae=models["vae"], text_encoder=models["text_encoder"],
        tokenizer=loaded["tokenizer"], scheduler=scheduler, source=source, device=device,
        dtype=dtype, prediction_type=scheduler.config.prediction_type,
        vae_scale_factor=vae_scale_factor, native_resolution=native_resolution(source),
        text_encoder_2=models.get("text_encoder_2"), tokenizer_2=loaded.get("tokenizer_2"),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)))


def native_resolution(source: ModelSource) -> int:
    """The frame side a base model was trained at (512 for SD 1.x, 768 for SD 2.x-768), from
    its configs alone: `unet.sample_size` times the VAE's downscaling."""
    unet = read_json(source.path / "unet" / "config.json")
    vae = read_json(source.path / "vae" / "config.json")
    downscale: int = 2 ** (len(vae["block_out_channels"]) - 1)
    return int(unet["sample_size"]) * downscale


def frames_for_base(frames: ExtractSettings, source: ModelSource) -> ExtractSettings:
    """What the one-shot `tune CLIP` extracts on this base where the user said nothing: frames
    at its native size, and on SDXL `SDXL_DEFAULT_FRAMES` of them (what fits a 24 GB card)."""
    if frames.size is None:
        frames = dataclasses.replace(frames, size=str(native_resolution(source)))
    if frames.frames is None and source.family == "sdxl":
        frames = dataclasses.replace(frames, frames=SDXL_DEFAULT_FRAMES)
    return frames
