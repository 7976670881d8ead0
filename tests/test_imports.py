"""Start-up stays light: answering --version or --help, or refusing a bad input, imports no
torch or diffusers (seconds of a user's time each run)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vedit
from vedit.errors import ProjectLockedError
from vedit.project import Project

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")
# Runs the `vedit` entry point as the console script does, then says what it imported.
PROBE = f"""
import sys
from vedit.__main__ import main
sys.argv = ["vedit", *sys.argv[1:]]
try:
    main()
finally:
    heavy = [name for name in {HEAVY!r} if name in sys.modules]
    sys.stderr.write(f"\\nimported: {{heavy}}\\n")
"""


@pytest.mark.parametrize(("args", "code"), [
    (["--version"], 0),
    (["--help"], 0),
    (["tune", "--help"], 0),
    (["extract", "MISSING.mp4"], 3),
    (["tune", "MISSING.mp4", "--prompt", "a cat"], 3),
    (["fetch-models", "nobody/nothing"], 6),
    (["remux", "MISSING"], 4),
    (["status", "MISSING"], 4),
])
def test_start_up_and_early_errors_import_no_model_library(tmp_path: Path, args: list[str],
                                                          code: int) -> None:
    argv = [str(tmp_path / a) if a.startswith("MISSING") else a for a in args]
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          timeout=120, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == code, done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == "imported: []"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tune", "edit"])
def test_a_busy_project_is_refused_before_any_model_library_loads(tmp_path: Path,
                                                                  command: str) -> None:
    """The lock is checked first: a second vedit on a project being written says so at once
    (it took ~1 min on a loaded machine, after torch, diffusers and the models had loaded)."""
    project = Project.create(tmp_path / "clip.vedit")
    with project.lock("tune"):
        done = subprocess.run([sys.executable, "-c", PROBE, command, str(project.root),
                               "--prompt", "a cat"], capture_output=True, text=True,
                              timeout=120, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == ProjectLockedError.exit_code, done.stderr
    assert "is in use by `vedit tune`" in done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == "imported: []"


def _vedit_imports(path: Path) -> set[str]:
    """The vedit modules a module imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vedit":
                found |= {f"vedit.{alias.name}" for alias in node.names}
            elif node.module.startswith("vedit."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("vedit.")}
    return found


def test_no_module_imports_itself_through_others() -> None:
    """The modules form layers: no import cycle, not even through a deferred import."""
    package = Path(vedit.__file__).parent
    graph = {f"vedit.{p.stem}": _vedit_imports(p) for p in package.glob("*.py")}
    graph = {name: {m for m in deps if m in graph} for name, deps in graph.items()}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            name, path = stack.pop()
            for dep in graph[name]:
                if dep == start:
                    cycles.append(" -> ".join([*path, dep]))
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, [*path, dep]))
    assert not cycles, "\n".join(cycles)
