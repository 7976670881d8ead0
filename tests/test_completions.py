"""The committed completion scripts are current, and the bash one completes for real."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup

from vedit.cli import app
from vedit.completions import SHELLS, render

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_committed_scripts_are_current(shell: str) -> None:
    committed = (COMPLETIONS / SHELLS[shell]).read_text(encoding="utf-8")
    assert committed == render(shell), (
        f"completions/{SHELLS[shell]} is stale: run `python -m vedit.completions completions`")


def _complete(words: str, tmp_path: Path) -> list[str]:
    script = COMPLETIONS / SHELLS["bash"]
    line = words.split(" ")
    program = (f'source "{script}"; COMP_WORDS=({" ".join(repr(w) for w in line)}); '
               f'COMP_CWORD={len(line) - 1}; _vedit; printf "%s\\n" "${{COMPREPLY[@]}}"')
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, cwd=tmp_path,
                          check=True)
    return [w for w in done.stdout.splitlines() if w]


def test_bash_completes_commands_options_and_paths(tmp_path: Path) -> None:
    (tmp_path / "clip.mp4").write_bytes(b"")
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    commands = sorted(group.commands)
    assert _complete("vedit ", tmp_path) == commands
    assert _complete("vedit ex", tmp_path) == ["extract"]
    assert "--frames" in _complete("vedit extract --fr", tmp_path)
    assert _complete("vedit extract --frames ", tmp_path) == []
    assert _complete("vedit extract cl", tmp_path) == ["clip.mp4"]
    assert _complete("vedit remux p --video cl", tmp_path) == ["clip.mp4"]
