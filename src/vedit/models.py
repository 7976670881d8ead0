"""The base Stable Diffusion model on disk: find it, check it, load its components.

A model is named by a hub repo id (kept in the standard Hugging Face cache), a local diffusers
folder, or an original single-file `.safetensors` checkpoint (converted once by
`vedit.single_file`, then used like a folder). Everything here reads local files only, so a stage
never hangs on a download; `vedit.hub` is what fetches. Weights are read from safetensors only:
no pickle, no remote code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vedit.errors import BadInputError, ModelNotFoundError
from vedit.progress import Reporter

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"

#: The pipeline components vedit uses, in model_index.json's names; the safety checker is not one.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
CONFIG_FILE = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
               "scheduler": "scheduler_config.json"}

#: A diffusers weight file name: `NAME[.VARIANT][-00001-of-00002].safetensors`.
WEIGHT_NAME = re.compile(r"^[^.]+?(?:\.(?P<variant>[^.]+?))?(?:-\d+-of-\d+)?\.safetensors$")
SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

SourceKind = Literal["hub", "folder", "single_file"]


@dataclass(frozen=True)
class ComponentInfo:
    """What one component folder holds: its weight files, their variant, dtype and size."""

    name: str
    weight_files: tuple[str, ...] = ()
    variant: str | None = None
    dtype: str | None = None
    size_bytes: int = 0


@dataclass(frozen=True)
class ModelSource:
    """A base model resolved to a local diffusers folder, and where it came from."""

    name: str
    kind: SourceKind
    path: Path
    components: Mapping[str, ComponentInfo]
    revision: str | None = None
    commit_hash: str | None = None
    source_file: Path | None = None

    @property
    def size_bytes(self) -> int:
        return sum(component.size_bytes for component in self.components.values())

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self)


@dataclass(frozen=True)
class CachedModel:
    """One model `vedit.hub.list_models` found on disk."""

    name: str
    kind: SourceKind
    path: Path
    size_bytes: int
    commit_hash: str | None = None
    refs: tuple[str, ...] = ()


@dataclass
class Components:
    """The loaded components of a base model and the facts stages need about it."""

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
                  variant: str | None = None, reporter: Reporter | None = None) -> ModelSource:
    """Find `spec` on disk: a cached hub repo, a diffusers folder, or a single-file checkpoint
    (converted on first use when configs for it are cached). Raises if it is not usable."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(str(path.resolve()), "folder", path.resolve(),
                           inspect_model_folder(path, variant=variant))
    if path.is_file():
        from vedit.single_file import resolve_single_file  # imported here: it builds on this module

        return resolve_single_file(path.resolve(), variant=variant, reporter=reporter)
    repo_id = as_repo_id(str(spec))
    return _resolve_cached_repo(repo_id, revision=revision, variant=variant)


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


def _resolve_cached_repo(repo_id: str, *, revision: str | None,
                         variant: str | None) -> ModelSource:
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is None:
        raise ModelNotFoundError(
            f"{repo_id} is not in the Hugging Face cache ({hub_cache_dir()}).",
            f"Run `vedit fetch-models {repo_id}` first (with network; the cache can then be "
            "copied to an offline machine).")
    try:
        components = inspect_model_folder(snapshot, variant=variant)
    except BadInputError as error:
        raise ModelNotFoundError(f"The cached copy of {repo_id} is incomplete: {error.message}",
                                 f"Run `vedit fetch-models {repo_id}` to finish it.") from None
    return ModelSource(repo_id, "hub", snapshot, components, revision=revision,
                       commit_hash=snapshot.name)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, honouring HF_HUB_CACHE and HF_HOME as set now."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (a branch, tag or commit), if any."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=hub_cache_dir(),
                                   revision=revision)
    return Path(found).parent if isinstance(found, str) else None


# --- what a diffusers SD 1.x/2.x folder must hold ------------------------------------------


def inspect_model_folder(path: Path, *, variant: str | None = None) -> dict[str, ComponentInfo]:
    """Check a diffusers SD 1.x/2.x folder has every component vedit needs; describe each."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise BadInputError(f"{path} is not a diffusers model folder (no model_index.json).",
                            "Point to a folder saved with `save_pretrained`, a hub id or a "
                            ".safetensors checkpoint.")
    components = {name: _inspect_component(path, name, variant) for name in COMPONENTS}
    check_is_sd_unet(path)
    return components


def _inspect_component(root: Path, name: str, variant: str | None) -> ComponentInfo:
    files = files_in(root / name)
    names = [p.name for p in files]
    if name == "tokenizer":
        if not has_tokenizer_files(names):
            raise _missing(root, name, "no tokenizer files (vocab.json and merges.txt, or "
                                       "tokenizer.json)")
        return ComponentInfo(name, size_bytes=_size_of(files))
    if CONFIG_FILE[name] not in names:
        raise _missing(root, name, f"no {name}/{CONFIG_FILE[name]}")
    if name == "scheduler":
        return ComponentInfo(name, size_bytes=_size_of(files))
    chosen_variant, weights = choose_weight_files(names, variant)
    if not weights:
        pickles = [n for n in names if n.endswith((".bin", ".ckpt", ".pt", ".pth"))]
        detail = (f"only pickle weights ({', '.join(pickles)}); vedit loads safetensors only"
                  if pickles else "no .safetensors weights")
        raise _missing(root, name, detail)
    weight_paths = [root / name / w for w in weights]
    configs = [p for p in files if p.suffix == ".json"]
    return ComponentInfo(name, tuple(f"{name}/{w}" for w in weights), chosen_variant,
                         _weights_dtype(weight_paths), _size_of(weight_paths + configs))


def _missing(root: Path, component: str, detail: str) -> BadInputError:
    return BadInputError(f"The model at {root} lacks its {component}: {detail}.",
                         "Use a complete diffusers Stable Diffusion 1.x/2.x folder "
                         "(unet, vae, text_encoder, tokenizer, scheduler).")


def check_is_sd_unet(root: Path) -> None:
    """Reject SDXL, inpainting and other UNets that look like SD's folder but aren't SD 1.x/2.x."""
    config = _read_json(root / "unet" / "config.json")
    kind = config.get("_class_name", "UNet2DConditionModel")
    if config.get("addition_embed_type") is not None:
        kind += " with SDXL-style added conditioning"
    if kind != "UNet2DConditionModel":
        raise BadInputError(f"{root} is not a Stable Diffusion 1.x/2.x model (its unet is {kind}).",
                            "vedit supports Stable Diffusion 1.x and 2.x base models.")
    if config.get("in_channels", 4) != 4:
        raise BadInputError(f"{root} is an inpainting or image-conditioned model "
                            f"({config['in_channels']} input channels).",
                            "Use a text-to-image Stable Diffusion 1.x/2.x base model.")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        raise BadInputError(f"{path} is not a valid JSON config.", "Download or copy it again.")
    return data


def choose_weight_files(names: Iterable[str], variant: str | None) -> tuple[str | None, list[str]]:
    """Pick one set of safetensors weights in a component folder: the asked variant if there,
    else the plain files, else the only variant present. Returns (variant used, file names)."""
    by_variant: dict[str | None, list[str]] = {}
    for name in names:
        match = WEIGHT_NAME.match(name)
        if match:
            by_variant.setdefault(match["variant"], []).append(name)
    for candidate in (variant, None):
        if candidate in by_variant:
            return candidate, sorted(by_variant[candidate])
    if len(by_variant) == 1:
        only = next(iter(by_variant))
        return only, sorted(by_variant[only])
    return None, []


def has_tokenizer_files(names: Iterable[str]) -> bool:
    present = set(names)
    return "tokenizer.json" in present or {"vocab.json", "merges.txt"} <= present


def files_in(folder: Path) -> list[Path]:
    """The files directly in `folder`, sorted; none if it is not a folder."""
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _size_of(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def _weights_dtype(paths: Iterable[Path]) -> str:
    """The dtype of a component's floating-point tensors, read from the safetensors headers."""
    dtypes = set()
    for path in paths:
        dtypes |= {entry["dtype"] for key, entry in read_safetensors_header(path).items()
                   if key != "__metadata__" and entry["dtype"] in SAFETENSORS_DTYPES}
    names = sorted(SAFETENSORS_DTYPES[d] for d in dtypes)
    return names[0] if len(names) == 1 else "mixed(" + ",".join(names) + ")"


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header without loading tensors; truncated or foreign files raise."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 2 <= length <= min(size - 8, 100_000_000):
            raise _bad_safetensors(path)
        try:
            header = json.loads(f.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items()
                    if key != "__metadata__"]
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError,
                IndexError):
            raise _bad_safetensors(path) from None
    if max(ends, default=0) > size - 8 - length:
        raise _bad_safetensors(path)
    return header


def _bad_safetensors(path: Path) -> BadInputError:
    return BadInputError(f"{path} is not a complete safetensors file (truncated or another "
                         "format).", "Download or copy it again.")


# --- fingerprints ---------------------------------------------------------------------------


def model_fingerprint(source: ModelSource) -> str:
    """A stable string naming exactly which base weights are used, for cache keys and for
    recording the base of a checkpoint: `hf:REPO@COMMIT`, `file:NAME#HASH` or `dir:PATH#HASH`.
    A `+VARIANT` suffix marks variant (e.g. fp16) weights."""
    variants = sorted({c.variant for c in source.components.values() if c.variant})
    suffix = "".join(f"+{v}" for v in variants)
    if source.kind == "hub":
        return f"hf:{source.name}@{source.commit_hash}{suffix}"
    if source.kind == "single_file" and source.source_file is not None:
        return f"file:{source.source_file.name}#{source.path.name}{suffix}"
    return f"dir:{source.path}#{_folder_digest(source)}{suffix}"


def _folder_digest(source: ModelSource) -> str:
    """Hash of the component configs and of the weight files' names, sizes and mtimes."""
    digest = hashlib.sha256()
    for name in COMPONENTS:
        for path in files_in(source.path / name):
            digest.update(path.relative_to(source.path).as_posix().encode())
            if path.suffix in (".json", ".txt"):
                digest.update(path.read_bytes())
            elif f"{name}/{path.name}" in source.components[name].weight_files:
                stat = path.stat()
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


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
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no emulation and no argument
        return torch.cuda.is_bf16_supported()


def load_components(model_spec: str | Path = DEFAULT_MODEL, *, device: str | torch.device,
                    dtype: torch.dtype | None = None, revision: str | None = None,
                    variant: str | None = None, reporter: Reporter | None = None) -> Components:
    """Load the UNet, VAE, text encoder, tokenizer and a DDIM scheduler of a base model from
    local files, frozen and in eval mode, on `device` in `dtype` (default: `default_dtype`)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from vedit.sampler import ddim_scheduler

    reporter = reporter or Reporter()
    source = resolve_model(model_spec, revision=revision, variant=variant, reporter=reporter)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    folder = str(source.path)
    loading = reporter.task(f"Loading {source.name}", total=len(COMPONENTS))
    with quiet_library_progress(), loading as task:
        models = {}
        for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                          ("text_encoder", CLIPTextModel)):
            models[name] = cls.from_pretrained(folder, subfolder=name, torch_dtype=dtype,
                                               use_safetensors=True, local_files_only=True,
                                               variant=source.components[name].variant)
            models[name].to(device).eval().requires_grad_(False)
            task.advance()
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer",
                                                  local_files_only=True)
        scheduler = ddim_scheduler(source.path)
        task.advance(2)
    vae_scale_factor = 2 ** (len(models["vae"].config.block_out_channels) - 1)
    return Components(
        unet=models["unet"], vae=models["vae"], text_encoder=models["text_encoder"],
        tokenizer=tokenizer, scheduler=scheduler, source=source, device=device, dtype=dtype,
        prediction_type=scheduler.config.prediction_type, vae_scale_factor=vae_scale_factor,
        native_resolution=native_resolution(source))


def native_resolution(source: ModelSource) -> int:
    """The frame side a base model was trained at (512 for SD 1.x, 768 for SD 2.x-768), from
    its configs alone: `unet.sample_size` times the VAE's downscaling."""
    unet = _read_json(source.path / "unet" / "config.json")
    vae = _read_json(source.path / "vae" / "config.json")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


@contextmanager
def quiet_library_progress() -> Iterator[None]:
    """Hide diffusers' and transformers' own tqdm bars while loading or saving models: vedit's
    progress goes through its Reporter, and stderr stays clean."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(lib, lib.is_progress_bar_enabled())
              for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in states:
            if enabled:
                lib.enable_progress_bar()
