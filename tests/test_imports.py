"""Start-up stays light: answering --version or --help, or refusing a bad input, imports no
torch or diffusers (seconds of a user's time each run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    (["fetch-models", "nobody/nothing"], 6),
    (["remux", "MISSING"], 4),
])
def test_start_up_and_early_errors_import_no_model_library(tmp_path: Path, args: list[str],
                                                          code: int) -> None:
    argv = [str(tmp_path / a) if a.startswith("MISSING") else a for a in args]
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          timeout=120, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == code, done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == "imported: []"
