"""The project folder: record, atomic writes, the lock, cache keys, safe paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vedit.errors import ProjectError, ProjectLockedError
from vedit.project import (
    FORMAT,
    LOCK_NAME,
    RECORD_NAME,
    Project,
    atomic_dir,
    atomic_file,
    cache_key,
    locked_early,
)


def test_create_then_open_round_trips_the_record(tmp_path: Path) -> None:
    project = Project.create(tmp_path / "p")
    project.record["frames"] = {"count": 3, "times": [0.0, 0.5, 1.0], "note": "a \"quoted\" é"}
    project.record["empty"] = None
    project.save()
    again = Project.open(tmp_path / "p")
    assert again.record["format"] == FORMAT
    assert again.record["frames"] == {"count": 3, "times": [0.0, 0.5, 1.0],
                                      "note": "a \"quoted\" é"}
    assert "empty" not in again.record


def test_open_refuses_what_is_not_a_project(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="does not exist"):
        Project.open(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ProjectError, match="not a vedit project"):
        Project.open(tmp_path / "other")
    with pytest.raises(ProjectError, match="not empty and is not a vedit project"):
        Project.create(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_project_from_a_newer_vedit_is_refused_with_an_upgrade_hint(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    (root / RECORD_NAME).write_text(f"format = {FORMAT + 1}\n")
    with pytest.raises(ProjectError, match="newer vedit") as caught:
        Project.open(root)
    assert "pip install -U vedit" in caught.value.hint


def test_a_record_edited_into_nonsense_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    (root / RECORD_NAME).write_text("format = [unclosed\n")
    with pytest.raises(ProjectError, match="not valid TOML"):
        Project.open(root)
    (root / RECORD_NAME).write_text("frames = 3\n")
    with pytest.raises(ProjectError, match="no valid format"):
        Project.open(root)
    (root / RECORD_NAME).write_text("format = 1\nframes = 3\n")
    with pytest.raises(ProjectError, match="malformed"):
        Project.open(root).section("frames")


def test_paths_from_the_record_cannot_leave_the_project(tmp_path: Path) -> None:
    project = Project.create(tmp_path / "p")
    assert project.inside("frames") == (tmp_path / "p" / "frames").resolve()
    for escape in ("../outside", "/etc/passwd", "frames/../../x"):
        with pytest.raises(ProjectError, match="outside the project"):
            project.inside(escape)


def test_cache_key_changes_with_any_input_and_only_then() -> None:
    base = cache_key("frames", {"a": 1, "b": [1, 2]})
    assert base == cache_key("frames", {"b": [1, 2], "a": 1})  # order of keys is irrelevant
    assert base != cache_key("frames", {"a": 2, "b": [1, 2]})
    assert base != cache_key("latents", {"a": 1, "b": [1, 2]})


def test_atomic_file_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as temp:
        temp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
    with atomic_file(target) as temp:
        temp.write_text("new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_dir_swaps_whole_folders(tmp_path: Path) -> None:
    target = tmp_path / "frames"
    target.mkdir()
    (target / "old.png").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as staging:
        (staging / "new.png").write_text("new")
        raise KeyboardInterrupt
    assert sorted(os.listdir(target)) == ["old.png"]
    with atomic_dir(target) as staging:
        (staging / "new.png").write_text("new")
    assert sorted(os.listdir(target)) == ["new.png"]
    assert sorted(os.listdir(tmp_path)) == ["frames"]


def test_a_second_writer_is_refused_and_told_who_holds_the_lock(tmp_path: Path) -> None:
    first = Project.create(tmp_path / "p")
    second = Project.open(tmp_path / "p")
    with first.lock("tune"):
        with pytest.raises(ProjectLockedError, match=r"vedit tune.*pid") as caught, \
                second.lock("edit"):
            pass
        assert caught.value.exit_code == 5
    with second.lock("edit"):  # free again once released
        pass


def test_the_early_lock_of_the_cli_is_taken_again_by_its_stage_only(tmp_path: Path) -> None:
    root = Project.create(tmp_path / "p").root
    with locked_early(root, "edit"):
        with Project.open(root).lock("edit") as project:  # the stage, in the CLI's lock
            project.save()
        assert (root / LOCK_NAME).exists()
    # Once it is released, a second writer is refused again.
    with Project.open(root).lock("tune"), pytest.raises(ProjectLockedError), \
            Project.open(root).lock("edit"):
        pass
    with locked_early(tmp_path / "not-yet", "tune"):  # nothing to lock before extract
        assert not (tmp_path / "not-yet").exists()


def test_the_lock_is_released_when_the_block_fails(tmp_path: Path) -> None:
    project = Project.create(tmp_path / "p")
    with pytest.raises(ValueError), project.lock("extract"):
        raise ValueError
    with project.lock("extract"):
        pass


@pytest.mark.slow
def test_a_killed_holder_leaves_a_lock_the_next_run_can_take(tmp_path: Path) -> None:
    root = tmp_path / "p"
    Project.create(root)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from vedit.project import Project
        with Project.open(Path({str(root)!r})).lock("tune"):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ProjectLockedError), Project.open(root).lock("edit"):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        deadline = time.monotonic() + 5
        while True:
            try:
                with Project.open(root).lock("edit"):
                    break
            except ProjectLockedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        holder.kill()
        holder.wait()
    assert (root / LOCK_NAME).exists()


def test_taking_the_lock_sweeps_temporaries_a_killed_run_left(tmp_path: Path) -> None:
    project = Project.create(tmp_path / "p")
    (project.root / "frames").mkdir()
    leftover_dir = project.root / ".frames.tmp-abc123"
    leftover_dir.mkdir()
    (leftover_dir / "00000.png").write_text("half")
    leftover_file = project.root / "frames" / ".x.png.tmp-def456"
    leftover_file.write_text("half")
    with project.lock("extract"):
        assert not leftover_dir.exists()
        assert not leftover_file.exists()
