"""CLIP models for scoring edits: which files a hub repo needs, finding them on disk, loading.

A scoring model is a transformers CLIP (`config.json` with `model_type` "clip", safetensors
weights) with its image processor and tokenizer, named by a hub id (kept in the standard
Hugging Face cache by `vedit fetch-models`) or a local folder saved with `save_pretrained`.
PickScore was trained with another repo's processor (LAION's CLIP-H), fetched beside it.
Like models.py, everything here reads local files only; `vedit.hub` fetches. Only
safetensors are loaded, and no model code from a repo is ever run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vedit.errors import BadInputError, ModelNotFoundError
from vedit.model_files import choose_weight_files, has_tokenizer_files, hub_cache_dir
from vedit.models import as_repo_id
from vedit.progress import Reporter, quiet_library_progress

if TYPE_CHECKING:
    import numpy as np
    import torch

#: LOVEU-TGVE's and V2VBench's CLIP for frame consistency and text alignment.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
#: Models scored with another repo's processor, as their authors do.
PROCESSOR_REPOS = {PICKSCORE_MODEL: "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
#: What `vedit fetch-models --scoring` fetches.
SCORING_MODELS = (DEFAULT_CLIP_MODEL, PICKSCORE_MODEL)
PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.json")
IMAGE_BATCH = 16  # frames embedded at once: bounded memory for long clips


@dataclass(frozen=True)
class ClipSource:
    """A CLIP model resolved to local folders: its weights and config, and its processor."""

    name: str
    path: Path
    processor_path: Path
    weight_files: tuple[str, ...]
    variant: str | None
    size_bytes: int
    commit_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "clip", "path": str(self.path),
                "processor_path": str(self.processor_path), "weight_files": self.weight_files,
                "size_bytes": self.size_bytes, "commit_hash": self.commit_hash}


# --- what a repo or folder must hold --------------------------------------------------------


def select_clip_files(repo_id: str, repo_files: Iterable[str]) -> list[str]:
    """The files of a CLIP repo vedit needs: config.json, one set of safetensors weights and
    (unless PROCESSOR_REPOS names another repo's) the processor files at its top level; never
    pickles, TensorFlow or Flax weights."""
    top = sorted(f for f in repo_files if "/" not in f)
    _, weights = choose_weight_files(top, None)
    if not weights:
        raise BadInputError(f"{repo_id} has no .safetensors weights (vedit loads safetensors "
                            "only, never pickle).", "Pick a CLIP repo that has model.safetensors.")
    index = [f for f in top if f.endswith(".safetensors.index.json")]
    processor = [] if repo_id in PROCESSOR_REPOS else [f for f in PROCESSOR_FILES if f in top]
    return ["config.json", *processor, *index, *weights]


def select_processor_files(repo_id: str, repo_files: Iterable[str]) -> list[str]:
    """Only the image processor and tokenizer files of a repo (for a model that borrows them)."""
    present = [f for f in PROCESSOR_FILES if f in set(repo_files)]
    if "preprocessor_config.json" not in present or not has_tokenizer_files(present):
        raise BadInputError(f"{repo_id} has no complete CLIP processor (preprocessor_config.json "
                            "and tokenizer files).", "Check the repo id.")
    return present


def check_clip_config(folder: Path) -> None:
    """Refuse a folder whose config.json is not a CLIP model's (before its weights are read)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict) or config.get("model_type") != "clip":
        kind = config.get("model_type") if isinstance(config, dict) else None
        what = f"its model_type is {kind!r}" if kind else "no valid config.json"
        raise BadInputError(f"{folder} is not a CLIP model ({what}).",
                            f"Give a CLIP repo or folder, e.g. {DEFAULT_CLIP_MODEL}.")


def is_clip_folder(folder: Path) -> bool:
    """Whether a folder holds a transformers CLIP model (rather than a diffusers pipeline)."""
    folder = Path(folder)
    return not (folder / "model_index.json").exists() and (folder / "config.json").is_file()


# --- resolving a name to local folders --------------------------------------------------------


def resolve_clip(spec: str | Path = DEFAULT_CLIP_MODEL) -> ClipSource:
    """Find a CLIP model on disk: a local folder (with its processor files), or a cached hub
    repo (with its processor repo's files where PROCESSOR_REPOS names one)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return inspect_clip(str(path.resolve()), path.resolve())
    repo_id = as_repo_id(str(spec))
    snapshot = _cached(repo_id, "config.json")
    processor_repo = PROCESSOR_REPOS.get(repo_id, repo_id)
    processor = snapshot if processor_repo == repo_id else _cached(processor_repo,
                                                                    "preprocessor_config.json")
    if snapshot is None or processor is None:
        raise ModelNotFoundError(
            f"{repo_id} is not in the Hugging Face cache ({hub_cache_dir()}).",
            f"Run `vedit fetch-models {repo_id}` first (with network; the cache can then be "
            "copied to an offline machine).")
    try:
        return inspect_clip(repo_id, snapshot, processor, snapshot.name)
    except BadInputError as error:
        raise ModelNotFoundError(f"The cached copy of {repo_id} is incomplete: {error.message}",
                                 f"Run `vedit fetch-models {repo_id}` to finish it.") from None


def _cached(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir())
    return Path(found).parent if isinstance(found, str) else None


def inspect_clip(name: str, folder: Path, processor: Path | None = None,
                 commit: str | None = None) -> ClipSource:
    """Check a folder holds a CLIP's config and safetensors weights, and `processor` (default:
    the same folder) its image processor and tokenizer; describe them."""
    processor = processor or folder
    check_clip_config(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    variant, weights = choose_weight_files(names, None)
    if not weights:
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        detail = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise BadInputError(f"{folder} has {detail}; vedit loads safetensors only.",
                            "Save the model with `save_pretrained(safe_serialization=True)`.")
    select_processor_files(str(processor), [p.name for p in processor.iterdir()])
    size = sum((folder / f).stat().st_size for f in weights)
    return ClipSource(name, folder, processor, tuple(weights), variant, size, commit)


# --- loading and embedding --------------------------------------------------------------------


class ClipModel:
    """A loaded CLIP: unit-length image and text embeddings, as LOVEU-TGVE and PickScore use."""

    def __init__(self, source: ClipSource, device: str | torch.device,
                 reporter: Reporter | None = None) -> None:
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        self.source = source
        self.reporter = reporter or Reporter()
        self.device = torch.device(device)
        with quiet_library_progress():
            self.model = CLIPModel.from_pretrained(
                str(source.path), use_safetensors=True, local_files_only=True,
                variant=source.variant, torch_dtype=torch.float32).to(self.device).eval()
            self.model.requires_grad_(False)
            self.image_processor = image_processor_class().from_pretrained(
                str(source.processor_path), local_files_only=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(str(source.processor_path),
                                                           local_files_only=True)

    @property
    def logit_scale(self) -> float:
        """The model's learned temperature, exp(logit_scale): 100 for OpenAI's CLIP."""
        return float(self.model.logit_scale.detach().exp())

    def image_embeddings(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB frames `(h, w, 3)` uint8 to unit embeddings `(n, d)` float32 on the CPU."""
        import torch

        pixels = self.image_processor(images=list(frames), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            embeds = self.model.visual_projection(pooled)
        return _unit(embeds).float().cpu()

    def text_embedding(self, prompt: str) -> torch.Tensor:
        """A prompt's unit embedding `(d,)` on the CPU; a prompt longer than the model reads is
        cut, with a warning."""
        import torch

        limit = int(self.tokenizer.model_max_length)
        if len(self.tokenizer(prompt)["input_ids"]) > limit:
            self.reporter.warn(f"The prompt {prompt[:40]!r}... is longer than "
                               f"{self.source.name} reads ({limit} tokens); it is scored cut.")
        tokens = self.tokenizer([prompt], padding=True, truncation=True, max_length=limit,
                                return_tensors="pt")
        with torch.no_grad():
            pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(
                                               self.device)).pooler_output
            embeds = self.model.text_projection(pooled)
        return _unit(embeds)[0].float().cpu()


def _unit(embeds: torch.Tensor) -> torch.Tensor:
    from torch.nn.functional import normalize

    return normalize(embeds, dim=-1)


def image_processor_class() -> Any:
    """CLIP's PIL image processor, the one the benchmarks' scripts ran: transformers 5 calls it
    CLIPImageProcessorPil (its CLIPImageProcessor needs torchvision), transformers 4
    CLIPImageProcessor."""
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor
    return CLIPImageProcessorPil
