"""`vedit status`: what a project holds, what is stale or damaged, and what the next command
would reuse. Read-only: it takes no lock, writes nothing and imports no model library, so it
answers at once even while another vedit is writing (it then reads a moment of that run).

A damaged project (an unreadable record, a truncated cache file, a missing frame) is reported
item by item, never raised: finding what is wrong is what the command is for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors

from vedit import tomlio
from vedit.checkpoints import LORA_FILE, RECORD, TEMPORAL_FILE, read_checkpoint
from vedit.errors import BadInputError, ProjectError
from vedit.project import EDIT_VIDEO, FINAL_VIDEO, RECORD_NAME, Project, file_sha256

SPARK = "▁▂▃▄▅▆▇█"
EDIT_RECORD = "edit.toml"


@dataclass
class Status:
    """The facts `vedit status` reports, as plain data (its --json)."""

    project: str
    source: dict[str, Any] | None = None
    frames: dict[str, Any] | None = None
    latents: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    inversions: list[dict[str, Any]] = field(default_factory=list)
    edits: list[dict[str, Any]] = field(default_factory=list)
    next: dict[str, str] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "project": self.project, "source": self.source, "frames": self.frames,
            "latents": self.latents, "checkpoints": self.checkpoints, "loss": self.loss,
            "inversions": self.inversions, "edits": self.edits, "next": self.next,
            "damaged": self.damaged,
        }


def project_status(root: Path) -> Status:
    """What the project at `root` holds; ProjectError only when it is no project at all."""
    root = Path(root)
    status = Status(str(root))
    record = _record(root, status)
    frames = record.get("frames")
    frames_key = frames.get("key") if isinstance(frames, dict) else None
    status.source = _source(record, status)
    status.frames = _frames(root, frames, status) if isinstance(frames, dict) else None
    losses = _losses(root, status)
    status.loss = [loss for _, loss in sorted(losses.items())]
    status.checkpoints = _checkpoints(root, frames_key, losses, status)
    status.latents = _cached(root / "latents", status, frames_key)
    status.edits = _edits(root, {c["name"] for c in status.checkpoints}, status)
    status.inversions = _inversions(root, status)
    status.next = _next(status, frames_key)
    return status


def _record(root: Path, status: Status) -> dict[str, Any]:
    if not (root / RECORD_NAME).is_file():
        Project.open(root)  # raises the ProjectError that says what is missing
    try:
        record = Project.open(root).record
    except ProjectError as exc:
        status.damaged.append(exc.message)
        return {}
    return record


def _source(record: dict[str, Any], status: Status) -> dict[str, Any] | None:
    source = record.get("source")
    if not isinstance(source, dict):
        return None
    video = source.get("video") or {}
    facts = {k: source.get(k) for k in ("path", "name", "duration")} | {
        k: video.get(k) for k in ("codec", "width", "height", "fps", "frame_count")}
    path = Path(str(source.get("path", "")))
    if not path.is_file():
        facts["state"] = "missing (remux and edit --full need it)"
    elif (path.stat().st_size != source.get("size_bytes")
          or file_sha256(path) != source.get("sha256")):
        facts["state"] = "changed since extract (run `vedit extract` again)"
    else:
        facts["state"] = "unchanged"
    return facts


def _frames(root: Path, frames: dict[str, Any], status: Status) -> dict[str, Any]:
    times = list(frames.get("times", []))
    facts = {k: frames.get(k) for k in ("count", "width", "height", "fps", "key")}
    facts["times"] = [times[0], times[-1]] if times else []
    on_disk = len(list((root / str(frames.get("dir", "frames"))).glob("*.png")))
    facts["files"] = on_disk
    if on_disk != frames.get("count"):
        status.damaged.append(f"frames/ holds {on_disk} frames, the record {frames.get('count')}"
                              " (run `vedit extract` again).")
    return facts


def _losses(root: Path, status: Status) -> dict[int, float]:
    """The smoothed loss of each tuning step in logs/tune.jsonl (its last run's, for a step
    logged twice)."""
    log = root / "logs" / "tune.jsonl"
    losses: dict[int, float] = {}
    if not log.is_file():
        return losses
    for number, line in enumerate(log.read_text(encoding="utf-8", errors="replace")
                                  .splitlines(), 1):
        try:
            entry = json.loads(line)
            losses[int(entry["step"])] = float(entry.get("smoothed", entry["loss"]))
        except (ValueError, KeyError, TypeError):
            status.damaged.append(f"logs/tune.jsonl line {number} is not a loss entry.")
    return losses


def _checkpoints(root: Path, frames_key: str | None, losses: dict[int, float],
                 status: Status) -> list[dict[str, Any]]:
    found = []
    folder = root / "checkpoints"
    for path in sorted(folder.glob("step-*")) if folder.is_dir() else []:
        if not (path / RECORD).is_file():
            continue  # a folder being written (it appears whole) or not vedit's
        try:
            checkpoint = read_checkpoint(path)
        except BadInputError as exc:
            status.damaged.append(exc.message)
            continue
        settings = checkpoint.record.get("settings", {})
        entry = {"name": checkpoint.name, "step": checkpoint.step,
                 "loss": losses.get(checkpoint.step),
                 "base_model": checkpoint.record.get("base_model"),
                 "base_fingerprint": checkpoint.record.get("base_fingerprint"),
                 "settings": {k: settings.get(k) for k in ("prompt", "steps", "lr", "rank",
                                                           "lora_targets", "seed")},
                 "state": "current" if checkpoint.record.get("frames_key") == frames_key
                 else "stale: tuned on other frames"}
        for name in (LORA_FILE, TEMPORAL_FILE):
            problem = _tensor_file_problem(path / name)
            if problem:
                status.damaged.append(f"{checkpoint.name}/{name} {problem}.")
                entry["state"] = "damaged"
        found.append(entry)
    return sorted(found, key=lambda c: c["step"])


def _tensor_file_problem(path: Path) -> str | None:
    if not path.is_file():
        return "is missing"
    return None if _header(path) is not None else "is truncated or not a safetensors file"


def _header(path: Path) -> dict[str, str] | None:
    """A safetensors file's metadata, checked whole (size included) without reading its
    tensors; None when the file is truncated or not one."""
    try:
        with safetensors.safe_open(str(path), framework="np") as handle:
            return dict(handle.metadata() or {})
    except (safetensors.SafetensorError, OSError):
        return None


def _cached(folder: Path, status: Status, frames_key: str | None) -> list[dict[str, Any]]:
    """The latents cache: one file per base model the frames were encoded with."""
    found = []
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        metadata = _header(path)
        if metadata is None:
            status.damaged.append(f"latents/{path.name} is truncated or not a safetensors file "
                                  "(delete it: it is recomputed).")
            continue
        fresh = metadata.get("frames_key") == frames_key
        found.append({"file": path.name, "model": metadata.get("model"),
                      "state": "current" if fresh else "stale: other frames"})
    return found


def _edits(root: Path, checkpoints: set[str], status: Status) -> list[dict[str, Any]]:
    found = []
    folder = root / "edits"
    for path in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue  # an edit being written
        try:
            record = tomlio.loads((path / EDIT_RECORD).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomlio.TOMLDecodeError):
            status.damaged.append(f"edits/{path.name}/{EDIT_RECORD} is missing or unreadable.")
            continue
        if not (path / EDIT_VIDEO).is_file():
            status.damaged.append(f"edits/{path.name}/{EDIT_VIDEO} is missing.")
        checkpoint = str(record.get("checkpoint"))
        inversion = record.get("inversion") or {}
        found.append({
            "name": path.name, "prompt": record.get("prompt"), "checkpoint": checkpoint,
            "frames": record.get("frames"), "full": bool(record.get("full")),
            "remuxed": (path / FINAL_VIDEO).is_file(), "inversion": inversion.get("key"),
            "steps": (record.get("settings") or {}).get("steps"),
            "inversion_prompt": bool((record.get("settings") or {}).get("inversion_prompt")),
            "state": "current" if checkpoint in checkpoints else "its checkpoint is gone"})
    return found


def _inversions(root: Path, status: Status) -> list[dict[str, Any]]:
    """The inversion cache, each with the checkpoint, steps and prompt of the edits that used
    it (an inversion is keyed by them: an edit with the same ones reuses it)."""
    by_key = {e["inversion"]: e for e in status.edits if e["inversion"]}
    found = []
    folder = root / "inversions"
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        partial = path.name.endswith(".partial.safetensors")
        key = path.name.removesuffix(".safetensors").removesuffix(".partial")
        if _header(path) is None:
            status.damaged.append(f"inversions/{path.name} is truncated or not a safetensors "
                                  "file (delete it: it is recomputed).")
            continue
        used = by_key.get(key)
        found.append({"key": key, "whole": not partial,
                      "checkpoint": used["checkpoint"] if used else None,
                      "steps": used["steps"] if used else None,
                      "source_prompt": used["inversion_prompt"] if used else None})
    return found


def _next(status: Status, frames_key: str | None) -> dict[str, str]:
    """What the next command would do with what is here."""
    if status.frames is None:
        return {"extract": "nothing extracted yet: run `vedit extract CLIP -o PROJECT`"}
    current = [c for c in status.checkpoints if c["state"] == "current"]
    if not current:
        return {"tune": "no checkpoint for these frames: tune starts from step 0"}
    latest = current[-1]
    tuned_to = latest["settings"].get("steps")
    plan = {"tune": f"`--resume` continues from {latest['name']} to step {tuned_to}"
            if tuned_to and latest["step"] < tuned_to
            else f"tuned to step {latest['step']}: `--resume --steps N` goes on; without "
            "--resume tune starts over, replacing the checkpoints"}
    encoded = any(c["state"] == "current" and c["model"] == latest["base_fingerprint"]
                  for c in status.latents)
    reuse = [f"{i['key']} at --steps {i['steps']}" for i in status.inversions
             if i["whole"] and i["checkpoint"] == latest["name"]]
    plan["edit"] = (f"uses {latest['name']}; "
                    + ("reuses the cached latents" if encoded else "encodes the frames anew")
                    + (f"; reuses inversion {', '.join(reuse)}" if reuse
                       else "; inverts the clip anew"))
    return plan


def sparkline(values: list[float], width: int = 60) -> str:
    """The values as one line of block characters, averaged down to `width` at most."""
    if not values:
        return ""
    buckets = min(width, len(values))
    means = [sum(chunk) / len(chunk) for chunk in
             (values[i * len(values) // buckets:(i + 1) * len(values) // buckets]
              for i in range(buckets))]
    low, high = min(means), max(means)
    span = (high - low) or 1.0
    return "".join(SPARK[round((m - low) / span * (len(SPARK) - 1))] for m in means)


def describe(status: Status) -> str:
    """The human form of `status`, a few lines a section."""
    lines = [f"Project {status.project}"]
    if status.source:
        s = status.source
        lines.append(f"  source       {s['name']}: {s['width']}x{s['height']} {s['codec']}, "
                     f"{s['fps']} fps, {s['duration']} s ({s['state']})")
    if status.frames:
        f = status.frames
        span = f"{f['times'][0]:.2f}-{f['times'][-1]:.2f} s" if f["times"] else "no times"
        lines.append(f"  frames       {f['count']} at {f['width']}x{f['height']}, {span}")
    for c in status.latents:
        lines.append(f"  latents      {c['model']} ({c['state']})")
    for c in status.checkpoints:
        loss = f"loss {c['loss']:.4f}" if c["loss"] is not None else "no loss logged"
        lines.append(f"  checkpoint   {c['name']}: {loss}, {c['base_model']}, "
                     f"lr {c['settings']['lr']}, rank {c['settings']['rank']} ({c['state']})")
    if status.loss:
        lines.append(f"  loss         {sparkline(status.loss)}  (smoothed) "
                     f"{status.loss[0]:.4f} -> {status.loss[-1]:.4f}")
    for i in status.inversions:
        made = (f"{i['checkpoint']}, {i['steps']} steps, "
                f"{'source' if i['source_prompt'] else 'empty'} prompt"
                if i["checkpoint"] else "no edit records it")
        lines.append(f"  inversion    {i['key']}: {made} ({'whole' if i['whole'] else 'partial'})")
    for e in status.edits:
        lines.append(f"  edit         {e['name']}: {e['prompt']!r}, {e['checkpoint']}, "
                     f"{'remuxed' if e['remuxed'] else 'not remuxed'} ({e['state']})")
    for command, plan in status.next.items():
        lines.append(f"  next {command:<8}{plan}")
    lines += [f"  damaged      {d}" for d in status.damaged]
    return "\n".join(lines)
