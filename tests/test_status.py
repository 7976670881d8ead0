"""`vedit status`: the facts of a project, its stale and damaged parts, read without writing.

The project is laid out by hand, as the stages write it (no model is run), so these tests take
well under a second each."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from vedit import tomlio
from vedit.checkpoints import LORA_FILE, RECORD, TEMPORAL_FILE
from vedit.cli import app
from vedit.project import RECORD_NAME, Project, file_sha256
from vedit.status import project_status, sparkline
from vedit.tensorfiles import save_tensors

runner = CliRunner()
FRAMES_KEY = "f00dfeedf00dfeed"
MODEL = "dir:/models/sd#abc"


def _tensors(path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {"x": torch.zeros(2, 3)}, metadata)


def make_project(tmp_path: Path) -> Path:
    """A project after extract, tune (checkpoints at steps 2 and 4), one edit and a remux."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not really a video, but it has a hash")
    project = Project.create(tmp_path / "clip.vedit")
    project.record["source"] = {
        "path": str(clip), "name": clip.name, "sha256": file_sha256(clip),
        "size_bytes": clip.stat().st_size, "duration": 2.0,
        "video": {"codec": "h264", "width": 640, "height": 360, "fps": 25.0, "frame_count": 50}}
    project.record["frames"] = {"key": FRAMES_KEY, "count": 3, "width": 64, "height": 64,
                                "fps": 12.5, "times": [0.0, 0.08, 0.16], "dir": "frames"}
    project.save()
    root = project.root
    (root / "frames").mkdir()
    for index in range(3):
        (root / "frames" / f"{index:05d}.png").write_bytes(b"png")
    for step in (2, 4):
        folder = root / "checkpoints" / f"step-{step}"
        _tensors(folder / LORA_FILE, {})
        _tensors(folder / TEMPORAL_FILE, {})
        (folder / RECORD).write_text(tomlio.dumps({
            "step": step, "base_model": "/models/sd", "base_fingerprint": MODEL,
            "frames_key": FRAMES_KEY, "settings": {"prompt": "a man skiing", "steps": 6,
                                                   "lr": 3e-5, "rank": 16}}))
    (root / "logs").mkdir()
    (root / "logs" / "tune.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0 / s, "smoothed": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)))
    _tensors(root / "latents" / "aaaa.safetensors", {"frames_key": FRAMES_KEY, "model": MODEL})
    _tensors(root / "latents" / "bbbb.safetensors", {"frames_key": "older", "model": MODEL})
    _tensors(root / "inversions" / "inv1.safetensors", {"key": "inv1"})
    _tensors(root / "inversions" / "inv2.partial.safetensors", {"key": "inv2"})
    edit = root / "edits" / "a-fox"
    edit.mkdir(parents=True)
    (edit / "video.mp4").write_bytes(b"mp4")
    (edit / "final.mp4").write_bytes(b"mp4")
    (edit / "edit.toml").write_text(tomlio.dumps({
        "prompt": "a fox skiing", "checkpoint": "step-2", "frames": 3,
        "settings": {"steps": 50, "inversion_prompt": False}, "inversion": {"key": "inv1"}}))
    return root


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_status_reports_every_stage_and_what_the_next_edit_reuses(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    status = project_status(root).to_dict()
    assert status["source"]["state"] == "unchanged" and status["source"]["width"] == 640
    assert status["frames"]["count"] == 3 and status["frames"]["times"] == [0.0, 0.16]
    assert [(c["name"], c["loss"], c["state"]) for c in status["checkpoints"]] == [
        ("step-2", 0.5, "current"), ("step-4", 0.25, "current")]
    assert status["loss"] == [1.0, 0.5, 1 / 3, 0.25]
    assert [(c["file"], c["state"]) for c in status["latents"]] == [
        ("aaaa.safetensors", "current"), ("bbbb.safetensors", "stale: other frames")]
    assert [(i["key"], i["whole"], i["checkpoint"], i["steps"]) for i in status["inversions"]] \
        == [("inv1", True, "step-2", 50), ("inv2", False, None, None)]
    assert [(e["name"], e["checkpoint"], e["remuxed"]) for e in status["edits"]] == [
        ("a-fox", "step-2", True)]
    assert "continues from step-4 to step 6" in status["next"]["tune"]
    # The latest checkpoint has no inversion yet; its latents are cached.
    assert status["next"]["edit"] == ("uses step-4; reuses the cached latents; "
                                      "inverts the clip anew")
    assert status["damaged"] == []


def test_status_says_what_is_stale(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    (tmp_path / "clip.mp4").write_bytes(b"another clip of another length")
    record = tomlio.loads((root / RECORD_NAME).read_text())
    record["frames"]["key"] = "re-extracted"
    (root / RECORD_NAME).write_text(tomlio.dumps(record))
    status = project_status(root)
    assert status.source is not None and status.source["state"].startswith("changed")
    assert {c["state"] for c in status.checkpoints} == {"stale: tuned on other frames"}
    assert {c["state"] for c in status.latents} == {"stale: other frames"}
    assert "tune starts from step 0" in status.next["tune"]


def test_status_on_a_damaged_project_says_what_is_damaged(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    latents = root / "latents" / "aaaa.safetensors"
    latents.write_bytes(latents.read_bytes()[:-5])
    (root / "checkpoints" / "step-4" / TEMPORAL_FILE).unlink()
    (root / "frames" / "00002.png").unlink()
    (root / "logs" / "tune.jsonl").open("a").write('{"step": 5, "lo')
    damaged = project_status(root).damaged
    assert damaged == [
        "frames/ holds 2 frames, the record 3 (run `vedit extract` again).",
        "logs/tune.jsonl line 5 is not a loss entry.",
        f"step-4/{TEMPORAL_FILE} is missing.",
        "latents/aaaa.safetensors is truncated or not a safetensors file (delete it: it is "
        "recomputed).",
    ]
    (root / RECORD_NAME).write_text("format = 1\n[frames\nbroken")  # edited by hand
    result = runner.invoke(app, ["status", str(root), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert "not valid TOML" in status["damaged"][0]
    assert status["frames"] is None and len(status["checkpoints"]) == 2


def test_status_is_read_only_and_answers_while_the_project_is_locked(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    before = _snapshot(root)
    with Project.open(root).lock("tune"):
        result = runner.invoke(app, ["status", str(root)])
    assert result.exit_code == 0, result.output
    assert "checkpoint   step-4: loss 0.2500" in result.stdout
    assert "edit         a-fox: 'a fox skiing', step-2, remuxed" in result.stdout
    assert "▁" in result.stdout and "█" in result.stdout  # the loss curve
    after = _snapshot(root)
    after.pop(str(root / ".vedit.lock"))  # the test's own lock
    assert after == before


def test_status_of_no_project_is_a_project_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 4 and "not a vedit project" in result.stderr


def test_the_loss_sparkline_averages_down_to_its_width() -> None:
    assert sparkline([4.0, 3.0, 2.0, 1.0]) == "█▆▃▁"
    assert sparkline([2.0, 2.0, 0.0, 0.0], width=2) == "█▁"
    assert sparkline([]) == ""
