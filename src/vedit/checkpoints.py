"""Tuning checkpoints: `checkpoints/step-N/` with the trained weights, their record and the
optimizer state, all in safetensors (no pickle, so loading a checkpoint never runs code).

    checkpoints/step-N/
      lora.safetensors       LoRA adapters, diffusers/peft keys prefixed `unet.`
      temporal.safetensors   the temporal attention (`...attn_temp.*`), keyed like the original
      training.safetensors   optimizer, random generator and fp16 loss-scale state, for --resume
      checkpoint.toml        step, base model and its fingerprint, settings, frames key

A folder is written whole under a temporary name and renamed, so one that exists is complete.
Listing and reading checkpoints needs no torch (the CLI checks its arguments, and `vedit
status` answers, in well under a second); the functions that handle weights import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vedit import tomlio
from vedit.errors import BadInputError, ProjectError
from vedit.project import Project, atomic_dir

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel
    from torch.amp import GradScaler

    from vedit.inflate import InflatedUNet

RECORD = "checkpoint.toml"
LORA_FILE = "lora.safetensors"
TEMPORAL_FILE = "temporal.safetensors"
TRAINING_FILE = "training.safetensors"
#: The fp16 gradient scaler's state in the training file (loss scale, growth tracker).
SCALER_KEY = "scaler.state"


@dataclass(frozen=True)
class Checkpoint:
    """A finished checkpoint folder and its record."""

    path: Path
    step: int
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name


def list_checkpoints(project: Project) -> list[Checkpoint]:
    """Every complete checkpoint, by step."""
    found = [read_checkpoint(path) for path in project.checkpoint_dirs()
             if (path / RECORD).is_file()]
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(project: Project) -> Checkpoint | None:
    found = list_checkpoints(project)
    return found[-1] if found else None


def find_checkpoint(project: Project, name: str | None = None) -> Checkpoint:
    """The named checkpoint (`step-300`, `300` or a path), or the latest one."""
    if name is None:
        latest = latest_checkpoint(project)
        if latest is None:
            raise ProjectError(f"Project {project.root} has no checkpoint yet.",
                               f"Run `vedit tune {project.root} --prompt ...` first.")
        return latest
    path = Path(name)
    if not path.is_dir():
        path = project.checkpoint_dir(name.removeprefix("step-"))
    if not (path / RECORD).is_file():
        known = ", ".join(c.name for c in list_checkpoints(project)) or "none"
        raise BadInputError(f"No checkpoint {name!r} in {project.root}.", f"Known: {known}.")
    return read_checkpoint(path)


def read_checkpoint(path: Path) -> Checkpoint:
    try:
        record = tomlio.loads((path / RECORD).read_text(encoding="utf-8"))
        step = int(record["step"])
    except (OSError, ValueError, KeyError, tomlio.TOMLDecodeError) as exc:
        raise BadInputError(
            f"Checkpoint {path} has an unreadable {RECORD} ({exc}).",
            "Delete that checkpoint folder and resume from an earlier one.") from None
    return Checkpoint(path, step, record)


def recorded_settings(project: Project, *, resume: bool) -> dict[str, Any]:
    """Tune defaults from the project's last tuning run: all its settings for --resume, else
    only its base model (a project keeps its base model unless --model says otherwise)."""
    latest = latest_checkpoint(project)
    if latest is not None:
        settings = dict(latest.record.get("settings", {}))
    else:
        settings = dict((project.section("tune") or {}).get("settings", {}))
    return settings if resume else {k: v for k, v in settings.items() if k == "model"}


def write_checkpoint(folder: Path, record: dict[str, Any], lora: dict[str, torch.Tensor],
                     temporal: dict[str, torch.Tensor],
                     training: dict[str, torch.Tensor] | None, metadata: dict[str, str]) -> None:
    """Write a whole checkpoint folder atomically."""
    from vedit.tensorfiles import save_tensors

    with atomic_dir(folder) as staging:
        save_tensors(staging / LORA_FILE, {f"unet.{k}": v for k, v in lora.items()}, metadata)
        save_tensors(staging / TEMPORAL_FILE, temporal, metadata)
        if training is not None:
            save_tensors(staging / TRAINING_FILE, training, {"vedit": "training-state"})
        (staging / RECORD).write_text(tomlio.dumps(record), encoding="utf-8")


# -- optimizer and generator state as plain tensors --------------------------------------------


def training_state(optimizer: torch.optim.Optimizer, generator_states: dict[str, torch.Tensor],
                   scaler: GradScaler | None = None) -> dict[str, torch.Tensor]:
    """Flatten an optimizer's state, generator states and an fp16 gradient scaler's state into
    named tensors."""
    import torch

    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{param_id}.{key}"] = torch.as_tensor(value)
    groups = [{k: v for k, v in group.items()} for group in state["param_groups"]]
    tensors["optimizer.param_groups"] = _json_tensor(groups)
    for name, generator_state in generator_states.items():
        tensors[f"generator.{name}"] = generator_state
    if scaler is not None and scaler.is_enabled():
        tensors[SCALER_KEY] = _json_tensor(scaler.state_dict())
    return tensors


def load_training_state(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer,
                        generators: dict[str, torch.Generator],
                        scaler: GradScaler | None = None) -> None:
    """Restore a checkpoint's optimizer, generator and fp16 scaler states (`training_state`),
    for --resume. A scaler starts afresh when the checkpoint has none (tuned without fp16)."""
    from vedit.tensorfiles import load_tensors

    tensors, _ = load_tensors(checkpoint.path / TRAINING_FILE)
    groups = _from_json_tensor(tensors["optimizer.param_groups"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if parts[0] == "optimizer" and len(parts) == 3:
            state.setdefault(int(parts[1]), {})[parts[2]] = value
    expected = sum(len(group["params"]) for group in optimizer.state_dict()["param_groups"])
    if sum(len(group["params"]) for group in groups) != expected:
        raise BadInputError("The checkpoint's optimizer state is for other trainable weights.",
                            "Resume with the LoRA rank and targets it was tuned with.")
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for name, generator in generators.items():
        if f"generator.{name}" in tensors:
            generator.set_state(tensors[f"generator.{name}"])
    if scaler is not None and scaler.is_enabled() and SCALER_KEY in tensors:
        scaler.load_state_dict(_from_json_tensor(tensors[SCALER_KEY]))


def _json_tensor(value: Any) -> torch.Tensor:
    """Plain numbers and lists as a uint8 tensor of their JSON, for a safetensors file."""
    import torch

    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def _from_json_tensor(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.tolist()).decode())


# -- the tuned model --------------------------------------------------------------------------


def load_weights(checkpoint: Checkpoint, unet: InflatedUNet) -> None:
    """Load a checkpoint's LoRA and temporal weights into an inflated UNet with LoRA added."""
    import torch

    from vedit.lora import load_lora_state_dict
    from vedit.tensorfiles import load_tensors

    lora, _ = load_tensors(checkpoint.path / LORA_FILE)
    load_lora_state_dict(unet, {k.removeprefix("unet."): v for k, v in lora.items()})
    temporal, _ = load_tensors(checkpoint.path / TEMPORAL_FILE)
    own = unet.temporal_parameters()
    for name, tensor in temporal.items():
        if name not in own:
            raise BadInputError(f"{checkpoint.name}/{TEMPORAL_FILE} holds a weight vedit does "
                                f"not know ({name}): it is not a vedit checkpoint.",
                                "Use a checkpoint written by `vedit tune`.")
        if own[name].shape != tensor.shape:
            raise BadInputError(f"{checkpoint.name} does not fit this UNet ({name}).",
                                "It was tuned on another base model.")
    missing = sorted(k for k in own if k not in temporal and ".attn_temp." in k)
    if missing:
        raise BadInputError(f"{checkpoint.name}/{TEMPORAL_FILE} lacks {len(missing)} weights "
                            f"(e.g. {missing[0]}).",
                            "The file is incomplete; use another checkpoint.")
    with torch.no_grad():
        for name, tensor in temporal.items():
            own[name].copy_(tensor)


def check_base(checkpoint: Checkpoint, model: str, fingerprint: str, hint: str) -> None:
    """Refuse a checkpoint tuned on other base weights than `model`'s (named by `fingerprint`,
    so a folder whose weights changed since tuning is refused too)."""
    tuned_on = checkpoint.record.get("base_model", "another model")
    if checkpoint.record.get("base_fingerprint") != fingerprint:
        now = "the model loaded now" if model == tuned_on else model
        raise BadInputError(f"{checkpoint.name} was tuned on {tuned_on}, not on {now}.", hint)


def tuned_unet(checkpoint: Checkpoint, base_unet: UNet2DConditionModel,
               base_fingerprint: str) -> InflatedUNet:
    """The checkpoint's base UNet (loaded from the model it records) inflated, with the
    checkpoint's LoRA and temporal weights, for sampling."""
    from vedit.inflate import inflate_unet
    from vedit.lora import add_lora

    recorded = str(checkpoint.record.get("base_model"))
    check_base(checkpoint, recorded, base_fingerprint,
               f"Load {recorded} (it is what the checkpoint records).")
    unet = inflate_unet(base_unet)
    add_lora(unet, rank=int(checkpoint.record["settings"]["rank"]),
             targets=checkpoint.record["lora_targets"])
    load_weights(checkpoint, unet)
    return unet.to(base_unet.device, base_unet.dtype).eval().requires_grad_(False)
