"""safetensors files: write, read, and results cached in the project as one.

Every tensor file vedit writes or reads goes through here (no pickle, so loading one never runs
code). It needs only torch and safetensors, so the modules that cache tensors (latents,
windows, invert) import no model library through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from vedit.errors import BadInputError
from vedit.progress import Reporter
from vedit.project import atomic_file


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file through Python's own file layer, so that a full disk surfaces
    as the OSError (ENOSPC) every other write gives."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = safetensors.torch.save(contiguous, metadata=metadata)
    with open(path, "wb") as handle:
        handle.write(data)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file; a truncated, corrupted or foreign file is a clear error."""
    if not path.is_file():
        raise BadInputError(f"{path} is missing.", "The checkpoint is incomplete; use another.")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise BadInputError(f"{path} is not a readable safetensors file ({exc}).",
                            "The file is corrupted or truncated; use another checkpoint.") from None
    return tensors, metadata


def cached_tensors(path: Path, compute: Callable[[], dict[str, torch.Tensor]],
                   metadata: dict[str, str], reused_note: str, reporter: Reporter, *,
                   shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors stored at `path`, or `compute()` now and stored there atomically (the caller
    holds the project lock); True when they were reused, which `reused_note` then says.

    A cache is only a cache: a stored file that is unreadable, or does not hold float tensors of
    exactly `shapes` (name: shape), is computed again, with a warning, rather than used."""
    if path.is_file():
        try:
            tensors, _ = load_tensors(path)
            problem = _unlike(tensors, shapes)
        except BadInputError as exc:
            problem = exc.message
        if problem is None:
            reporter.info(reused_note)
            return tensors, True
        reporter.warn(f"The cached {path.name} is damaged ({problem}); computing it again.")
    tensors = compute()
    with atomic_file(path) as temp:
        save_tensors(temp, tensors, metadata)
    return tensors, False


def _unlike(tensors: dict[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> str | None:
    """What keeps `tensors` from being float tensors of `shapes`, or None."""
    if set(tensors) != set(shapes):
        return f"it holds {sorted(tensors)}, not {sorted(shapes)}"
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape) or not tensors[name].is_floating_point():
            return (f"{name} is {tensors[name].dtype} of shape {tuple(tensors[name].shape)}, not "
                    f"floats of shape {tuple(shape)}")
    return None
