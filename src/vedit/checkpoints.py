"""Tuning checkpoints: `checkpoints/RUN/step-N/` with the trained weights, their record and
the optimizer state, all in safetensors (no pickle, so loading a checkpoint never runs code).

Each tuning run keeps its own folder (`run-1`, `run-2`, ...), so a new run never touches the
checkpoints of an earlier one; `--resume` continues the latest run. A project tuned before runs
were kept has its checkpoints right in `checkpoints/step-N/`: they read as a run of their own
(named "", shown as `step-N`), older than every numbered one.

    checkpoints/RUN/step-N/
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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vedit import schema, tomlio
from vedit.errors import BadInputError, ProjectError
from vedit.progress import Reporter
from vedit.project import FLAT_RUN, Project, atomic_dir
from vedit.settings import ATTENTIONS, PROJECTIONS, TuneSettings

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

_TARGET = "|".join(re.escape(f"{a}.{p}") for a in ATTENTIONS for p in PROJECTIONS)
#: What checkpoint.toml must hold, checked when it is read: a damaged one is named, not loaded.
RECORD_SCHEMA = schema.table({
    "step": schema.integer(0), "settings": schema.settings_of(TuneSettings),
    "lora_targets": schema.items(schema.text(_TARGET), at_least=1),
    "base_model": schema.text(), "base_fingerprint": schema.text(), "frames_key": schema.text(),
}, required=("step", "settings", "lora_targets", "base_model", "base_fingerprint"))


@dataclass(frozen=True)
class Checkpoint:
    """A finished checkpoint folder, the tuning run it belongs to, and its record."""

    path: Path
    step: int
    record: dict[str, Any]
    run: str = FLAT_RUN

    @property
    def name(self) -> str:
        """How commands name it: `RUN/step-N` (`step-N` in an older project's flat run)."""
        return Project.checkpoint_name(self.run, self.step)


def list_checkpoints(project: Project, reporter: Reporter | None = None) -> list[Checkpoint]:
    """Every complete checkpoint: run by run, oldest run first, each run by step; the last one
    is the latest. A damaged one is skipped (and named to `reporter`), so that it does not stop
    the use of the others."""
    found = []
    for run in project.run_names():
        complete = []
        for path in project.checkpoint_dirs(run):
            if (path / RECORD).is_file():
                try:
                    complete.append(read_checkpoint(path, run))
                except ProjectError as exc:
                    (reporter or Reporter()).warn(f"{exc.message} It is skipped.")
        found += sorted(complete, key=lambda c: c.step)
    return found


def next_run(project: Project) -> str:
    """The name of a new tuning run: one past the last run that has a checkpoint (a run folder
    an interrupted run left without one is taken again)."""
    numbers = [Project.run_number(c.run) for c in list_checkpoints(project)]
    return Project.run_name(max(numbers, default=0) + 1)


def latest_checkpoint(project: Project, reporter: Reporter | None = None) -> Checkpoint | None:
    found = list_checkpoints(project, reporter)
    return found[-1] if found else None


def find_checkpoint(project: Project, name: str | None = None,
                    reporter: Reporter | None = None) -> Checkpoint:
    """The named checkpoint, or the latest one (the last step of the latest run).

    A name is `RUN/step-N`; a run (`run-2`: its last step); `step-N` or `N` where only one run
    has that step; or the path of a checkpoint folder."""
    found = list_checkpoints(project, reporter)
    if name is None:
        if not found:
            raise ProjectError(f"Project {project.root} has no checkpoint yet.",
                               f"Run `vedit tune {project.root} --prompt ...` first.")
        return found[-1]
    text = name.strip().strip("/")
    named = [c for c in found if c.name == text] or [c for c in found if c.run == text][-1:]
    if not named and text.removeprefix("step-").isdigit():
        named = [c for c in found if c.step == int(text.removeprefix("step-"))]
        if len(named) > 1:
            raise BadInputError(
                f"Several tuning runs have a checkpoint {name!r}: "
                f"{', '.join(c.name for c in named)}.",
                f"Name one with its run, e.g. --checkpoint {named[-1].name}.")
    if named:
        return named[0]
    for path in (Path(name), *_folders_named(project, text)):
        if (path / RECORD).is_file():  # outside the project, or damaged: read says which
            inside = [c for c in found if c.path.resolve() == path.resolve()]
            return inside[0] if inside else read_checkpoint(path)
    known = ", ".join(c.name for c in found) or "none"
    raise BadInputError(f"No checkpoint {name!r} in {project.root}.", f"Known: {known}.")


def _folders_named(project: Project, text: str) -> list[Path]:
    """The project's checkpoint folders that `text` (`RUN/step-N`, `step-N` or `N`) names,
    complete or not: a damaged one, which listing skips, is then reported by name."""
    run, _, step = text.rpartition("/")
    step = step.removeprefix("step-")
    if not step.isdigit():
        return []
    known = project.run_names()
    return [project.checkpoint_dir(r, int(step)) for r in known if not run or r == run]


def read_checkpoint(path: Path, run: str = FLAT_RUN) -> Checkpoint:
    """A checkpoint folder's record, checked (RECORD_SCHEMA); a damaged one is a ProjectError."""
    hint = "Delete that checkpoint folder; resume from an earlier one or tune again."
    try:
        record = tomlio.loads((path / RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomlio.TOMLDecodeError) as exc:
        raise ProjectError(f"Checkpoint {path} has an unreadable {RECORD} ({exc}).",
                           hint) from None
    try:
        RECORD_SCHEMA(record, "")
    except schema.Invalid as exc:
        raise ProjectError(f"Checkpoint {path} has a damaged {RECORD}: {exc}.", hint) from None
    return Checkpoint(path, record["step"], record, run)


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

    path = checkpoint.path / TRAINING_FILE
    tensors, _ = load_tensors(path)
    try:
        groups = _from_json_tensor(tensors["optimizer.param_groups"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            parts = key.split(".")
            if parts[0] == "optimizer" and len(parts) == 3:
                state.setdefault(int(parts[1]), {})[parts[2]] = value
        counts = [len(group["params"]) for group in groups]
    except (KeyError, TypeError, ValueError) as exc:  # JSON, UTF-8 and int() errors among them
        raise _damaged_state(path, exc) from None
    expected = sum(len(group["params"]) for group in optimizer.state_dict()["param_groups"])
    if sum(counts) != expected:
        raise BadInputError("The checkpoint's optimizer state is for other trainable weights.",
                            "Resume with the LoRA rank and targets it was tuned with.")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        for name, generator in generators.items():
            if f"generator.{name}" in tensors:
                generator.set_state(tensors[f"generator.{name}"])
        if scaler is not None and scaler.is_enabled() and SCALER_KEY in tensors:
            scaler.load_state_dict(_from_json_tensor(tensors[SCALER_KEY]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise _damaged_state(path, exc) from None


def _damaged_state(path: Path, exc: Exception) -> ProjectError:
    return ProjectError(f"{path} holds a damaged training state ({type(exc).__name__}: "
                        f"{str(exc)[:100]}).",
                        "Resume from an earlier checkpoint (delete this one), or tune again.")


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

    lora = _float_weights(checkpoint, LORA_FILE)
    load_lora_state_dict(unet, {k.removeprefix("unet."): v for k, v in lora.items()})
    temporal = _float_weights(checkpoint, TEMPORAL_FILE)
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


def _float_weights(checkpoint: Checkpoint, file: str) -> dict[str, torch.Tensor]:
    """The weights in a checkpoint's `file`; tuned weights are floats, anything else (int64,
    bool) is not a vedit checkpoint and would be silently cast."""
    from vedit.tensorfiles import load_tensors

    tensors, _ = load_tensors(checkpoint.path / file)
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise BadInputError(f"{checkpoint.name}/{file} holds {name} as {tensor.dtype}, not "
                                "as floating-point weights: it is not a vedit checkpoint.",
                                "Use a checkpoint written by `vedit tune`.")
    return tensors


def check_base(checkpoint: Checkpoint, model: str, fingerprint: str, hint: str) -> None:
    """Refuse a checkpoint tuned on other base weights than `model`'s (named by `fingerprint`,
    so a folder whose weights changed since tuning is refused too)."""
    tuned_on = checkpoint.record.get("base_model", "another model")
    if checkpoint.record.get("base_fingerprint") != fingerprint:
        now = "the model loaded now" if model == tuned_on else model
        raise BadInputError(f"{checkpoint.name} was tuned on {tuned_on}, not on {now}.", hint)


def check_frames(checkpoint: Checkpoint, frames_key: str) -> None:
    """Refuse a checkpoint tuned on other frames than the project's (`frames_key`: extracted
    again since): resuming it, or editing with it, would use a model of other frames."""
    if checkpoint.record.get("frames_key") != frames_key:
        raise BadInputError(f"{checkpoint.name} was tuned on other frames of this project.",
                            "The frames were extracted again since; tune from the start.")


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
