"""What a base model's folder holds on disk: its components and weight files, safetensors
headers, the Hugging Face cache's layout, and the fingerprint that names exactly which weights
a cache or a checkpoint was made from.

Only files are read here, never weights loaded and never the network: `models` resolves and
loads, `single_file` converts, `hub` downloads, all on top of this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vedit.errors import BadInputError

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
#: The SDXL base: whose configs and tokenizers an SDXL single-file checkpoint borrows.
SDXL_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"

#: The pipeline components vedit uses, in model_index.json's names; the safety checker is not one.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: An SDXL base adds a second text encoder (with a projection) and its tokenizer.
SDXL_EXTRA_COMPONENTS = ("text_encoder_2", "tokenizer_2")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CONFIG_FILE = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
               "scheduler": "scheduler_config.json"}
SDXL_CONFIG_FILE = CONFIG_FILE | {"text_encoder_2": "config.json"}

#: The base-model families vedit knows: SD 1.x/2.x share one layout, SDXL has its own.
ModelFamily = Literal["sd", "sdxl"]

#: A diffusers weight file name: `NAME[.VARIANT][-00001-of-00002].safetensors`.
WEIGHT_NAME = re.compile(r"^[^.]+?(?:\.(?P<variant>[^.]+?))?(?:-\d+-of-\d+)?\.safetensors$")
SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}

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
    def family(self) -> ModelFamily:
        return "sdxl" if "text_encoder_2" in self.components else "sd"

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
    role: Literal["base", "scoring"] = "base"  # a Stable Diffusion base, or a CLIP for scoring


# --- the Hugging Face cache ------------------------------------------------------------------


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

# --- what a diffusers SD 1.x/2.x or SDXL folder must hold ------------------------------------


def inspect_model_folder(path: Path, *, variant: str | None = None,
                         configs_only: bool = False) -> dict[str, ComponentInfo]:
    """Check a diffusers SD 1.x/2.x or SDXL folder has every component vedit needs; describe
    each. `configs_only`: the configs and tokenizer suffice
    (no weights needed)."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise BadInputError(f"{path} is not a diffusers model folder (no model_index.json).",
                            "Point to a folder saved with `save_pretrained`, a hub id or a "
                            ".safetensors checkpoint.")
    components = {name: _inspect_component(path, name, variant, configs_only)
                  for name in COMPONENTS}
    if check_is_sd_unet(path) == "sdxl":
        components |= {name: _inspect_component(path, name, variant, configs_only)
                       for name in SDXL_EXTRA_COMPONENTS}
    return components


def _inspect_component(root: Path, name: str, variant: str | None,
                       configs_only: bool = False) -> ComponentInfo:
    files = files_in(root / name)
    names = [p.name for p in files]
    if name.startswith("tokenizer"):
        if not has_tokenizer_files(names):
            raise _missing(root, name, "no tokenizer files (vocab.json and merges.txt, or "
                                       "tokenizer.json)")
        return ComponentInfo(name, size_bytes=_size_of(files))
    if SDXL_CONFIG_FILE[name] not in names:
        raise _missing(root, name, f"no {name}/{SDXL_CONFIG_FILE[name]}")
    if name == "scheduler":
        return ComponentInfo(name, size_bytes=_size_of(files))
    chosen_variant, weights = choose_weight_files(names, variant)
    if not weights and configs_only:
        return ComponentInfo(name, size_bytes=_size_of(files))
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
    hint = ("Use a complete diffusers SDXL folder (it also has text_encoder_2 and tokenizer_2)."
            if component in SDXL_EXTRA_COMPONENTS else
            "Use a complete diffusers Stable Diffusion 1.x/2.x folder "
            "(unet, vae, text_encoder, tokenizer, scheduler).")
    return BadInputError(f"The model at {root} lacks its {component}: {detail}.", hint)


def check_is_sd_unet(root: Path) -> ModelFamily:
    """The family of the model at `root`, from its UNet config: reject inpainting and other UNets
    that look like SD's folder but aren't text-to-image SD 1.x/2.x or SDXL."""
    config = read_json(root / "unet" / "config.json")
    kind = config.get("_class_name", "UNet2DConditionModel")
    sdxl = kind == "UNet2DConditionModel" and config.get("addition_embed_type") == "text_time"
    if config.get("addition_embed_type") is not None and not sdxl:
        kind += f" with {config['addition_embed_type']!r} added conditioning"
    if kind != "UNet2DConditionModel":
        raise BadInputError(f"{root} is not a Stable Diffusion 1.x/2.x or SDXL model (its unet is "
                            f"{kind}).",
                            "vedit supports Stable Diffusion 1.x, 2.x and SDXL base models.")
    if config.get("in_channels", 4) != 4:
        raise BadInputError(f"{root} is an inpainting or image-conditioned model "
                            f"({config['in_channels']} input channels).",
                            "Use a text-to-image Stable Diffusion 1.x/2.x or SDXL base model.")
    return "sdxl" if sdxl else "sd"


def read_json(path: Path) -> dict[str, Any]:
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
    """Parse a safetensors header without loading tensors; a truncated or foreign file, or one
    whose header is not what the format says (every entry a known dtype, a shape of whole
    numbers and the offsets of exactly its bytes, within the file), is a BadInputError."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 2 <= length <= min(size - 8, 100_000_000):
            raise _bad_safetensors(path)
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _bad_safetensors(path) from None
    if not isinstance(header, dict) or not all(
            _is_metadata(entry) if key == "__metadata__" else
            _is_tensor_entry(entry, size - 8 - length) for key, entry in header.items()):
        raise _bad_safetensors(path)
    return header


#: Bytes per element of each safetensors dtype.
_ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_metadata(entry: object) -> bool:
    return isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())


def _is_tensor_entry(entry: object, data_size: int) -> bool:
    if not isinstance(entry, dict) or entry.get("dtype") not in _ITEM_SIZES:
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_whole(n) for n in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(_is_whole(n) for n in offsets)):
        return False
    begin, end = offsets
    return bool(begin <= end <= data_size
                and end - begin == math.prod(shape) * _ITEM_SIZES[entry["dtype"]])


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
    for name in source.components:
        for path in files_in(source.path / name):
            digest.update(path.relative_to(source.path).as_posix().encode())
            if path.suffix in (".json", ".txt"):
                digest.update(path.read_bytes())
            elif f"{name}/{path.name}" in source.components[name].weight_files:
                stat = path.stat()
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
