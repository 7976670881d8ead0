"""Original single-file `.safetensors` checkpoints: recognise them, convert each once.

A CompVis/LDM checkpoint holds the UNet, VAE and text encoder(s) in one file but no configs or
tokenizer, so converting borrows those from a cached diffusers repo of the same family (SD 1.x,
SD 2.x or SDXL base). The
result is a diffusers folder in vedit's cache, keyed by the file's content and then used like any
folder. Nothing here talks to the network: `vedit.hub.fetch_model` passes `fetch_configs` when
the configs may be downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vedit.errors import BadInputError, ModelNotFoundError
from vedit.model_files import (
    DEFAULT_MODEL,
    SAFETENSORS_DTYPES,
    SDXL_BASE_MODEL,
    CachedModel,
    ModelSource,
    cached_snapshot,
    inspect_model_folder,
    read_safetensors_header,
)
from vedit.progress import Reporter, quiet_library_progress

if TYPE_CHECKING:
    import torch

#: Diffusers configs (and tokenizer) to borrow when converting an original checkpoint, by family.
#: Any SD 1.x folder fits any SD 1.x checkpoint; SD 2.x 768-v and 512-base differ in prediction
#: type, so only diffusers' own default is trusted there; SDXL fine-tunes share the base's configs.
CONFIG_REPOS = {
    "v1": ("stable-diffusion-v1-5/stable-diffusion-v1-5", DEFAULT_MODEL,
           "runwayml/stable-diffusion-v1-5"),
    "v2": ("stabilityai/stable-diffusion-2-1",),
    "xl": (SDXL_BASE_MODEL,),
}

#: What each family is called in messages.
FAMILY_NAMES = {"v1": "SD 1.x", "v2": "SD 2.x", "xl": "SDXL"}

#: The tensors that mark an original SDXL checkpoint: its CLIP ViT-L and OpenCLIP bigG encoders
#: (the refiner has only the second, as embedder 0).
_SDXL_CLIP = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
_SDXL_OPEN_CLIP = "conditioner.embedders.1.model.positional_embedding"
_SDXL_REFINER = "conditioner.embedders.0.model.positional_embedding"

#: Downloads the configs and tokenizer of a hub repo: (repo id, hint if it cannot) -> folder.
FetchConfigs = Callable[[str, str], Path]

_PREFIX_HASH_BYTES = 16 * 1024 * 1024
_RECORD = "vedit_source.json"


def vedit_cache_dir() -> Path:
    """vedit's own cache (converted single-file models): VEDIT_CACHE_DIR or ~/.cache/vedit."""
    if os.environ.get("VEDIT_CACHE_DIR"):
        return Path(os.environ["VEDIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "vedit"


def resolve_single_file(path: Path, *, variant: str | None = None,
                        reporter: Reporter | None = None,
                        fetch_configs: FetchConfigs | None = None) -> ModelSource:
    """A single-file checkpoint, converted once into vedit's cache and loaded from there.
    Without `fetch_configs`, converting needs the configs of a cached diffusers repo."""
    reporter = reporter or Reporter()
    if path.suffix != ".safetensors":
        raise BadInputError(f"{path.name} is not a .safetensors file; vedit never loads pickled "
                            "checkpoints (.ckpt, .bin, .pt) because they can run code.",
                            "Use the model's .safetensors release, or a diffusers folder.")
    target = vedit_cache_dir() / "converted" / _file_key(path)
    if not (target / "model_index.json").is_file():
        shutil.rmtree(target, ignore_errors=True)  # a damaged earlier conversion
        family = _checkpoint_family(path)
        _convert(path, target, _config_folder(family, fetch_configs), family, reporter)
    return ModelSource(str(path), "single_file", target,
                       inspect_model_folder(target, variant=variant), source_file=path)


def _file_key(path: Path) -> str:
    """Content key of a big checkpoint without reading it all: size, then its first 16 MiB
    (the safetensors header names every tensor's dtype, shape and offset)."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_PREFIX_HASH_BYTES))
    return digest.hexdigest()[:32]


def _checkpoint_family(path: Path) -> str:
    """"v1", "v2" or "xl" from an original SD checkpoint's tensor names and shapes; else raise."""
    header = read_safetensors_header(path)
    conv_in = header.get("model.diffusion_model.input_blocks.0.0.weight")
    conditioned = any(k.startswith("conditioner.") for k in header)
    if conv_in is None:
        raise BadInputError(f"{path.name} is not an original Stable Diffusion 1.x/2.x or SDXL "
                            "checkpoint (it has no UNet).",
                            "Single files must be full checkpoints (UNet, VAE and text encoders); "
                            "lone UNet, VAE or LoRA files are not supported.")
    if conditioned and _SDXL_REFINER in header:
        raise BadInputError(f"{path.name} is an SDXL refiner checkpoint.",
                            "The refiner only polishes SDXL images; use an SDXL base checkpoint "
                            "or fine-tune.")
    if conditioned and not {_SDXL_CLIP, _SDXL_OPEN_CLIP} <= header.keys():
        raise BadInputError(f"{path.name} is not an original Stable Diffusion 1.x/2.x or SDXL "
                            "checkpoint (its text conditioning is neither).",
                            "Use a full SD 1.x/2.x or SDXL base checkpoint in safetensors.")
    if len(conv_in["shape"]) != 4:
        raise BadInputError(f"{path.name} is not an original Stable Diffusion 1.x/2.x or SDXL "
                            "checkpoint (its first convolution is not 4-D).",
                            "Use a full SD 1.x/2.x or SDXL checkpoint in safetensors.")
    if conv_in["shape"][1] != 4:
        raise BadInputError(f"{path.name} is an inpainting or image-conditioned checkpoint.",
                            "Use a text-to-image Stable Diffusion 1.x/2.x or SDXL checkpoint.")
    if conditioned:
        return "xl"
    # diffusers' own test: SD 2.x cross-attends to 1024-wide OpenCLIP states, SD 1.x to 768.
    to_k = header.get("model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k"
                      ".weight")
    return "v2" if to_k is not None and to_k["shape"][-1:] == [1024] else "v1"


def _config_folder(family: str, fetch_configs: FetchConfigs | None) -> Path:
    """A diffusers folder with the configs and tokenizer(s) for this family of checkpoint: a
    cached one when there is; otherwise what `fetch_configs` brings of diffusers' default repo."""
    candidates, name = CONFIG_REPOS[family], FAMILY_NAMES[family]
    for repo_id in candidates:
        snapshot = cached_snapshot(repo_id, None)
        if snapshot is not None and _has_configs(snapshot):
            return snapshot
    hint = (f"Run `vedit fetch-models {candidates[0]} --configs-only` (or any {name} diffusers "
            "repo) once with network: its configs and tokenizers are needed to convert the file.")
    if fetch_configs is None:
        raise ModelNotFoundError("Converting a single-file checkpoint needs the configs of a "
                                 f"diffusers {name} model, and none is cached.", hint)
    return fetch_configs(candidates[0], hint)


def _has_configs(folder: Path) -> bool:
    """Whether `folder` has every config and tokenizer its family needs (SDXL's second ones too)."""
    try:
        inspect_model_folder(folder, configs_only=True)
    except BadInputError:
        return False
    return True


def _convert(path: Path, target: Path, config: Path, family: str, reporter: Reporter) -> None:
    """Convert with diffusers' `from_single_file`, offline, keeping the checkpoint's dtype, and
    save as a diffusers folder (written aside, then renamed into place)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    pipeline_class = StableDiffusionXLPipeline if family == "xl" else StableDiffusionPipeline
    extra = {} if family == "xl" else {"safety_checker": None, "requires_safety_checker": False}
    staging = target.parent / f".{target.name}.converting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        converting = reporter.task(f"Converting {path.name} (once)")
        with quiet_library_progress(), converting as task:
            try:
                pipe = pipeline_class.from_single_file(
                    str(path), config=str(config), local_files_only=True,
                    torch_dtype=_checkpoint_torch_dtype(path), **extra)
            except (SingleFileComponentError, ValueError, KeyError) as error:
                raise BadInputError(f"{path.name} could not be converted: {error}",
                                    f"Check it is a complete {FAMILY_NAMES[family]} "
                                    "checkpoint.") from None
            task.update(status="saving")
            pipe.save_pretrained(staging, safe_serialization=True)
        record = {"source_file": str(path), "size": path.stat().st_size, "config": str(config)}
        (staging / _RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        try:
            os.replace(staging, target)
        except OSError:  # another process converted the same file meanwhile
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _checkpoint_torch_dtype(path: Path) -> torch.dtype:
    """The dtype of the checkpoint's UNet weights, so conversion neither bloats nor rounds them."""
    import torch

    dtypes = [entry["dtype"] for key, entry in read_safetensors_header(path).items()
              if key.startswith("model.diffusion_model.")]
    most = max(set(dtypes), key=dtypes.count) if dtypes else "F32"
    dtype: torch.dtype = getattr(torch, SAFETENSORS_DTYPES.get(most, "float32"))
    return dtype


def converted_models() -> list[CachedModel]:
    """The single-file checkpoints converted so far, with their converted folders' size."""
    found = []
    for record_path in sorted((vedit_cache_dir() / "converted").glob(f"*/{_RECORD}")):
        folder = record_path.parent
        try:
            name = str(json.loads(record_path.read_text(encoding="utf-8"))["source_file"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            name = folder.name  # a record damaged by hand: still list what is on disk
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        found.append(CachedModel(name, "single_file", folder, size))
    return found
