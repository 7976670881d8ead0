"""No write outside the project or the cache: links planted in a project, outputs that are not
files, and a hub that lies about its files or trickles them."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from hub_server import FakeHub
from pipeline_files import UNET_FILE
from typer.testing import CliRunner

from vedit.cli import app
from vedit.edit import edit
from vedit.errors import ModelNotFoundError
from vedit.extract import extract
from vedit.hub import fetch_model
from vedit.settings import EditSettings, ExtractSettings, TuneSettings
from vedit.synthetic import make_clip
from vedit.tune import tune

runner = CliRunner()
PROMPT = "a square slides"
REPO = "tiny-org/tiny-sd"


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links not followed) and a hash of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def edited(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A project with every folder: frames, latents, a checkpoint, an inversion, an edit."""
    root = tmp_path_factory.mktemp("security")
    clip = make_clip(root / "clip.mp4", width=96, height=64, fps=20, seconds=1.0)
    extract(clip, root / "p", ExtractSettings(frames=4, size="64"))
    tune(root / "p", TuneSettings(prompt=PROMPT, model=str(tiny_model), steps=1,
                                  checkpoint_every=0))
    edit(root / "p", ["a cat"], EditSettings(steps=1), name="cat")
    return root / "p"


@pytest.fixture()
def project(tmp_path: Path, edited: Path) -> Path:
    shutil.copytree(edited, tmp_path / "p", symlinks=True)
    shutil.copy(edited.parent / "clip.mp4", tmp_path / "clip.mp4")
    return tmp_path / "p"


EDIT = ["edit", "{p}", "-p", "a dog", "--steps", "1"]
LINKS = [  # what is replaced by a link to a copy outside the project, and the command run
    (".vedit.lock", ["remux", "{p}"]),
    (".vedit.lock", ["extract", "{clip}", "-o", "{p}", "-n", "3", "--size", "64"]),
    (".vedit.lock", ["tune", "{p}", "--prompt", PROMPT, "--steps", "1"]),
    (".vedit.lock", EDIT),
    ("checkpoints/run-1/tune.jsonl", ["tune", "{p}", "--resume", "--steps", "2"]),
    ("edits", EDIT),
    ("edits/cat", ["remux", "{p}"]),
    ("checkpoints/run-1/step-1", EDIT),
    ("checkpoints/run-1", EDIT),
    ("latents", EDIT),
    ("inversions", EDIT),
    ("frames", ["tune", "{p}", "--prompt", PROMPT, "--steps", "1"]),
    ("vedit.toml", ["remux", "{p}"]),
]


@pytest.mark.parametrize(("name", "command"), LINKS, ids=[f"{n}-{c[0]}" for n, c in LINKS])
def test_a_link_in_a_project_is_refused_not_followed(project: Path, tmp_path: Path, name: str,
                                                     command: list[str]) -> None:
    inside = project / name
    outside = tmp_path / "elsewhere" / Path(name).name
    outside.parent.mkdir()
    if inside.exists():
        shutil.move(inside, outside)
    else:
        outside.write_text("a file of the user's that must not be touched\n")
    inside.symlink_to(outside)
    before = tree(outside.parent)

    args = [a.format(p=project, clip=tmp_path / "clip.mp4") for a in command]
    result = runner.invoke(app, args)

    assert result.exit_code == 4, result.stderr
    assert f"{inside} is a symbolic link" in " ".join(result.stderr.split())
    assert tree(outside.parent) == before
    assert inside.is_symlink()


@pytest.mark.parametrize("kind", ["fifo", "folder", "link"])
def test_remux_writes_only_a_new_or_regular_file(project: Path, tmp_path: Path,
                                                 kind: str) -> None:
    target = tmp_path / "out.mp4"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    if kind == "fifo":
        os.mkfifo(target)  # like a device node: `-o /dev/null` as root must not replace it
    elif kind == "folder":
        target.mkdir()
    else:
        target.symlink_to(victim)
    video = project / "edits" / "cat" / "video.mp4"
    result = runner.invoke(app, ["remux", str(project), "--video", str(video), "-o",
                                 str(target)])
    assert result.exit_code == 3, result.stderr
    assert f"--output {target} is" in result.stderr and "Traceback" not in result.stderr
    assert victim.read_text() == "precious\n"
    assert (kind != "fifo" or target.is_fifo()) and (kind != "link" or target.is_symlink())


# -- a hub that lies ---------------------------------------------------------------------------


def outside_the_cache(root: Path) -> set[str]:
    """Every path under `root` that is not in the HF cache (HF_HOME is root/hf-home)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if not p.is_relative_to(root / "hf-home")}


@pytest.mark.parametrize("ids", [True, False], ids=["listing-ids", "no-listing-ids"])
def test_a_hostile_etag_writes_nothing_outside_the_cache(tiny_model: Path, fake_hub: FakeHub,
                                                         tmp_path: Path, ids: bool) -> None:
    fake_hub.add_folder(REPO, tiny_model)
    fake_hub.listing_ids = ids
    for name in (UNET_FILE, "model_index.json"):  # an LFS file and a small one
        fake_hub.serve_etag(name, "../../../../PWNED")
    before = outside_the_cache(tmp_path)
    if ids:  # files are named by the listing's checked ids: the ETag names nothing
        snapshot = fetch_model(REPO)
        assert (snapshot / UNET_FILE).read_bytes() == (tiny_model / UNET_FILE).read_bytes()
    else:
        with pytest.raises(ModelNotFoundError, match="malformed ETag"):
            fetch_model(REPO)
    assert outside_the_cache(tmp_path) == before


def test_a_hostile_commit_writes_nothing_outside_the_cache(tiny_model: Path, fake_hub: FakeHub,
                                                           tmp_path: Path) -> None:
    fake_hub.add_folder(REPO, tiny_model)
    _, files = fake_hub.repos[REPO]
    fake_hub.repos[REPO] = ("../../../../PWNED", files)
    result = runner.invoke(app, ["fetch-models", REPO])
    assert result.exit_code == 6 and "malformed commit" in result.stderr, result.stderr
    assert not list(tmp_path.rglob("PWNED*"))


def test_a_stalled_download_stops_and_resumes_later(tiny_model: Path, fake_hub: FakeHub,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_folder(REPO, tiny_model)
    fake_hub.slow_down(UNET_FILE, 20)  # 20 bytes a second: never a timeout, never done
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    result = runner.invoke(app, ["fetch-models", REPO])
    assert result.exit_code == 6, result.stderr
    assert "stalled" in result.stderr and "resumes" in result.stderr
    [partial] = (tmp_path / "hf-home" / "hub").glob("models--*/blobs/*.incomplete")
    held = partial.stat().st_size
    assert held > 0

    fake_hub._slow.clear()
    snapshot = fetch_model(REPO)
    assert (snapshot / UNET_FILE).read_bytes() == (tiny_model / UNET_FILE).read_bytes()
    assert [r.range_start for r in fake_hub.downloads(UNET_FILE) if r.range_start] == [held]
