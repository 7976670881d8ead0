"""`vedit fetch-models` as a user runs it: from a (fake) hub, a local folder, offline, --list."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from hub_server import FakeHub
from typer.testing import CliRunner

from vedit.cli import app

runner = CliRunner()
REPO = "tiny-org/tiny-sd"


def test_fetch_then_list_then_tune_on_the_hub_id(tiny_model: Path, fake_hub: FakeHub,
                                                 tmp_path: Path, clip_qcif: Path) -> None:
    sha = fake_hub.add_folder(REPO, tiny_model)
    fetched = runner.invoke(app, ["fetch-models", REPO, "--json"])
    assert fetched.exit_code == 0, fetched.stderr
    data = json.loads(fetched.stdout)
    assert data["kind"] == "hub" and data["commit_hash"] == sha
    assert data["fingerprint"] == f"hf:{REPO}@{sha}"
    assert set(data["components"]) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}

    listed = runner.invoke(app, ["fetch-models", "--list", "--json"])
    assert [m["name"] for m in json.loads(listed.stdout)["models"]] == [REPO]

    tuned = runner.invoke(app, ["tune", str(clip_qcif), "--project", str(tmp_path / "p"),
                                "--prompt", "a square", "--model", REPO, "-n", "4", "--size",
                                "64", "--steps", "1", "--json"])
    assert tuned.exit_code == 0, tuned.stderr


def test_the_user_config_names_the_default_model(tiny_model: Path, fake_hub: FakeHub,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_folder(REPO, tiny_model)
    config = tmp_path / "config.toml"
    config.write_text(f'model = "{REPO}"\n[edit]\nsteps = 20\n')
    monkeypatch.setenv("VEDIT_CONFIG", str(config))
    result = runner.invoke(app, ["fetch-models", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["name"] == REPO


def test_a_local_folder_is_validated(tiny_model: Path, tmp_path: Path) -> None:
    good = runner.invoke(app, ["fetch-models", str(tiny_model), "--json"])
    assert good.exit_code == 0, good.stderr
    facts = json.loads(good.stdout)
    assert facts["kind"] == "folder"
    assert facts["components"]["unet"]["dtype"] == "float32"
    assert facts["components"]["unet"]["size_bytes"] > 0

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "vae")
    bad = runner.invoke(app, ["fetch-models", str(broken)])
    assert bad.exit_code == 3
    assert "vae" in bad.stderr and "Traceback" not in bad.stderr


def test_offline_and_missing_fails_in_seconds_saying_what_to_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    result = runner.invoke(app, ["fetch-models", "some-org/not-here"])
    assert time.monotonic() - started < 5
    assert result.exit_code == 6
    assert "vedit fetch-models some-org/not-here" in " ".join(result.stderr.split())
