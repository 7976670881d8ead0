"""The files of a diffusers SD pipeline that vedit needs, for checks on folders and downloads."""

from __future__ import annotations

from pathlib import Path

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
NEEDED = {
    "model_index.json", "unet/config.json", UNET_FILE, "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
    "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
}


def snapshot_files(folder: Path) -> set[str]:
    """Every file under `folder`, as posix paths relative to it."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
