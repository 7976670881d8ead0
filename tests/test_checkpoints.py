"""Checkpoints of several tuning runs: how they are listed, named and chosen."""

from __future__ import annotations

from pathlib import Path

import pytest

from vedit import tomlio
from vedit.checkpoints import RECORD, find_checkpoint, list_checkpoints, next_run
from vedit.errors import BadInputError, ProjectError
from vedit.project import Project


@pytest.fixture()
def project(tmp_path: Path) -> Project:
    return Project.create(tmp_path / "p")


def checkpoint(project: Project, name: str) -> Path:
    """A checkpoint folder as far as listing goes: its record (`run-2/step-5`, or `step-5`)."""
    folder = project.checkpoints_dir / name
    folder.mkdir(parents=True)
    (folder / RECORD).write_text(tomlio.dumps({
        "step": int(name.rsplit("-", 1)[1]), "settings": {"prompt": "a man skiing"},
        "lora_targets": ["attn1.to_q"], "base_model": "/models/sd", "base_fingerprint": "f"}))
    return folder


def names(project: Project) -> list[str]:
    return [c.name for c in list_checkpoints(project)]


def test_runs_are_listed_oldest_first_and_steps_by_number(project: Project) -> None:
    for name in ("run-10/step-1", "run-2/step-10", "run-2/step-9", "step-4", "run-1/step-3"):
        checkpoint(project, name)
    (project.checkpoints_dir / "run-2" / "step-11").mkdir()  # unfinished: no record
    (project.checkpoints_dir / "run-3").mkdir()  # a run stopped before its first checkpoint
    (project.checkpoints_dir / "notes").mkdir()
    assert names(project) == ["step-4", "run-1/step-3", "run-2/step-9", "run-2/step-10",
                              "run-10/step-1"]
    assert find_checkpoint(project).name == "run-10/step-1"
    assert next_run(project) == "run-11"


def test_a_new_run_takes_the_next_number(project: Project) -> None:
    assert next_run(project) == "run-1"
    checkpoint(project, "step-6")  # a project tuned before runs were kept
    assert next_run(project) == "run-1"
    checkpoint(project, "run-1/step-6")
    (project.checkpoints_dir / "run-2").mkdir()
    (project.checkpoints_dir / "run-2" / "tune.jsonl").write_text("")  # stopped before step 1
    assert next_run(project) == "run-2"


def test_checkpoint_names(project: Project) -> None:
    checkpoint(project, "step-3")
    for name in ("run-1/step-3", "run-1/step-6", "run-2/step-3", "run-2/step-5"):
        checkpoint(project, name)
    assert find_checkpoint(project, "run-1/step-3").path == project.checkpoints_dir / "run-1/step-3"
    assert find_checkpoint(project, "run-1").name == "run-1/step-6"  # a run: its last step
    assert find_checkpoint(project, "6").name == "run-1/step-6"  # only one run has it
    assert find_checkpoint(project, "step-5").name == "run-2/step-5"
    assert find_checkpoint(project, "step-3").name == "step-3"  # the flat run's own name
    folder = project.checkpoints_dir / "run-2" / "step-3"
    assert find_checkpoint(project, str(folder)).name == "run-2/step-3"


def test_a_step_that_several_runs_have_is_ambiguous(project: Project) -> None:
    checkpoint(project, "run-1/step-3")
    checkpoint(project, "run-2/step-3")
    with pytest.raises(BadInputError, match="run-1/step-3, run-2/step-3") as caught:
        find_checkpoint(project, "3")
    assert "--checkpoint run-2/step-3" in caught.value.hint
    with pytest.raises(BadInputError, match="No checkpoint 'run-3'") as unknown:
        find_checkpoint(project, "run-3")
    assert unknown.value.hint == "Known: run-1/step-3, run-2/step-3."


def test_no_checkpoint_yet(project: Project) -> None:
    with pytest.raises(ProjectError, match="no checkpoint yet"):
        find_checkpoint(project)
