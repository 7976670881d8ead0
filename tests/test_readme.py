"""README.md stays true: CI runs its test command verbatim, and its exit-code table is real."""

from __future__ import annotations

import re
from pathlib import Path

from vedit.errors import EXIT_CODES
from vedit.settings import (
    EditSettings,
    ExtractSettings,
    ScoreSettings,
    TuneSettings,
    config_values,
    resolve,
)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command() -> None:
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line and not line.startswith(("#", "set ", "cd "))]
    assert len(ci_commands) == 1
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert ci_commands[0] in first_block.splitlines()


def test_exit_code_table_matches_the_code() -> None:
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", README, flags=re.MULTILINE))
    assert {int(code): text for code, text in rows.items()} == EXIT_CODES


def test_the_config_example_is_valid_for_every_command(tmp_path: Path) -> None:
    example = tmp_path / "vedit.toml"
    example.write_text(README.split("```toml", 1)[1].split("```", 1)[0])
    for section, classes in {"extract": [ExtractSettings],
                             "tune": [ExtractSettings, TuneSettings],
                             "edit": [EditSettings], "score": [ScoreSettings]}.items():
        values = config_values(example, [section])
        for cls in classes:
            resolve(cls, values)
    assert resolve(TuneSettings, config_values(example, ["tune"])).lora_targets == "q,v"
