"""The CLI contract: --json alone on stdout, --quiet, errors as a sentence + hint + exit code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup
from typer.testing import CliRunner, Result

from vedit import __version__
from vedit.cli import app
from vedit.errors import EXIT_CODES
from vedit.project import FORMAT

runner = CliRunner()


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, [str(a) for a in args], env=env)


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"vedit {__version__}"


def test_help_lists_the_exit_codes() -> None:
    result = run("--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())
    for code, meaning in EXIT_CODES.items():
        assert f"{code} {meaning.split(' (')[0]}" in text


def _command_names() -> list[str]:
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    return sorted(group.commands)


@pytest.mark.parametrize("command", [[], *([name] for name in _command_names())])
def test_help_at_80_columns_cuts_no_name_default_or_summary(command: list[str]) -> None:
    result = run(*command, "--help", env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    shown = result.stdout
    squeezed = "".join(shown.split())  # a help text wrapped over lines is still whole
    if command:
        target = group.commands[command[0]]
        assert "".join((target.help or "").split()) in squeezed
    else:
        target = group
        for name, sub in group.commands.items():
            summary = (sub.help or "").split(". ")[0]
            assert re.search(rf"^  {name} +{re.escape(summary)}", shown, re.M), summary
    for param in target.params:
        if param.param_type_name == "option":
            for name in [*param.opts, *param.secondary_opts]:
                assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", shown), name
        if getattr(param, "help", None) and not getattr(param, "hidden", False):
            assert "".join(param.help.split()) in squeezed, param.help


@pytest.mark.parametrize("command", [[], *([name] for name in _command_names())])
def test_help_shows_flags_as_flags(command: list[str]) -> None:
    """`--json`, not `--json <bool>`: a flag takes no value to name."""
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "--help" in result.stdout and ("--json" in result.stdout) == bool(command)
    assert "<bool>" not in result.stdout


def test_extract_json_is_the_only_thing_on_stdout(tmp_path: Path, clip_720p: Path) -> None:
    result = run("extract", clip_720p, "-o", tmp_path / "p", "--frames", "12", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["frame_count"] == 12
    assert (data["width"], data["height"]) == (912, 512)
    assert data["audio"].endswith("audio.m4a")
    assert len(data["frames"]) == 12 and all(Path(p).is_file() for p in data["frames"])


def test_quiet_success_prints_nothing(tmp_path: Path, clip_qcif: Path) -> None:
    result = run("extract", clip_qcif, "-o", tmp_path / "p", "-n", "4", "--size", "64", "-q")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""


def test_human_output_says_what_was_written(tmp_path: Path, clip_silent: Path) -> None:
    result = run("extract", clip_silent, "-o", tmp_path / "p", "-n", "4", "--size", "64")
    assert result.exit_code == 0
    assert "Wrote 4 frames of 88x64" in result.stdout
    span = re.search(r"The frames span 0\.00-(\d\.\d\d) s of the (\d\.\d\d) s clip", result.stdout)
    assert span, result.stdout
    assert float(span[1]) < float(span[2])
    assert "no audio" in result.stderr


def test_default_project_folder_is_beside_the_clip(tmp_path: Path, clip_silent: Path) -> None:
    clip = tmp_path / "walk.mp4"
    clip.write_bytes(clip_silent.read_bytes())
    result = run("extract", clip, "-n", "4", "--size", "64", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["project"] == str(tmp_path / "walk.vedit")


@pytest.mark.parametrize(("args", "code", "message"), [
    (["extract", "MISSING.mp4"], 3, "does not exist"),
    (["extract", "CLIP", "--frames", "0"], 3, "at least one frame"),
    (["extract", "CLIP", "--frames", "500"], 3, "but 500 were asked"),
    (["extract", "CLIP", "--size", "100000"], 3, "out of range"),
    (["extract", "CLIP", "--size", "abc"], 3, "not a size"),
    (["extract", "CLIP", "-o", "NOTPROJECT"], 4, "is not a vedit project"),
    (["extract", "CLIP", "-o", "NEWER"], 4, "newer vedit"),
    (["remux", "NOTPROJECT"], 4, "not a vedit project"),
    (["extract", "CLIP", "--bogus"], 2, "No such option"),
    (["extract", "CLIP", "--start", "nan"], 3, "--start nan is not a time in the clip"),
    (["extract", "CLIP", "--end", "inf"], 3, "--end inf is not a time in the clip"),
    (["extract", "CLIP", "--size", "\uff16\uff14"], 3, "not a size"),
    (["extract", "CLIP", "--size", ""], 3, "--size is empty"),
    (["extract", "CLIP", "--frames", "\uff14"], 2, "not a number in ASCII digits"),
    (["extract", "CLIP", "--start", "\uff11"], 2, "not a number in ASCII digits"),
])
def test_errors_are_one_sentence_a_hint_and_a_documented_code(
        tmp_path: Path, clip_qcif: Path, args: list[str], code: int, message: str) -> None:
    (tmp_path / "not").mkdir()
    (tmp_path / "not" / "mine.txt").write_text("x")
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "vedit.toml").write_text(f"format = {FORMAT + 1}\n")
    places = {"CLIP": clip_qcif, "MISSING.mp4": tmp_path / "missing.mp4",
              "NOTPROJECT": tmp_path / "not", "NEWER": tmp_path / "newer"}
    argv = [str(places.get(a, a)) for a in args]
    if argv[0] == "extract" and "-o" not in argv:
        argv += ["-o", str(tmp_path / "p")]
    result = run(*argv)
    assert result.exit_code == code
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    if code != 2:
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith("error: ") and lines[-1].startswith("hint: ")
        assert not (tmp_path / "p").exists()


def test_json_errors_are_a_json_document_too(tmp_path: Path) -> None:
    result = run("extract", tmp_path / "missing.mp4", "-o", tmp_path / "p", "--json")
    assert result.exit_code == 3
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "bad_input" and error["exit_code"] == 3 and error["hint"]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    quiet = run("extract", tmp_path / "missing.mp4", "-o", tmp_path / "p")
    assert "Traceback" not in quiet.stderr
    loud = run("extract", tmp_path / "missing.mp4", "-o", tmp_path / "p", "--debug")
    assert "Traceback" in loud.stderr and loud.exit_code == 3
    env = run("extract", tmp_path / "missing.mp4", "-o", tmp_path / "p", env={"VEDIT_DEBUG": "1"})
    assert "Traceback" in env.stderr


def test_config_file_values_and_flags(tmp_path: Path, clip_qcif: Path) -> None:
    config = tmp_path / "frames.toml"
    config.write_text("[extract]\nframes = 5\nstride = 3\nsize = 64\n")
    result = run("extract", clip_qcif, "-o", tmp_path / "p", "--config", config, "-n", "6",
                 "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["frame_count"] == 6
    assert data["times"][1] == pytest.approx(0.1)  # stride 3 at 30 fps
    bad = tmp_path / "bad.toml"
    bad.write_text("frams = 5\n")
    result = run("extract", clip_qcif, "-o", tmp_path / "q", "--config", bad)
    assert result.exit_code == 3 and "frams" in result.stderr


def test_remux_json(tmp_path: Path, clip_720p: Path) -> None:
    assert run("extract", clip_720p, "-o", tmp_path / "p", "-n", "4", "--size", "64").exit_code == 0
    render = tmp_path / "render.mp4"
    from vedit.synthetic import make_clip

    make_clip(render, width=64, height=64, fps=25, seconds=0.5, audio=False)
    result = run("remux", tmp_path / "p", "--video", render, "--json")
    assert result.exit_code == 0, result.stderr
    [output] = json.loads(result.stdout)["outputs"]
    assert output["audio"] == "copy" and Path(output["path"]).is_file()
    both = run("remux", tmp_path / "p", "cat", "--video", render)
    assert both.exit_code == 2


def test_the_installed_command_keeps_stdout_clean(tmp_path: Path, clip_qcif: Path) -> None:
    """The real console script in a real process: JSON on stdout, notices on stderr."""
    vedit = Path(sys.executable).with_name("vedit")
    command = [str(vedit)] if vedit.exists() else [sys.executable, "-m", "vedit"]
    done = subprocess.run([*command, "extract", str(clip_qcif), "-o", str(tmp_path / "p"),
                           "-n", "4", "--size", "64", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["frame_count"] == 4
    failed = subprocess.run([*command, "remux", str(tmp_path / "nowhere")], capture_output=True,
                            text=True, timeout=120)
    assert failed.returncode == 4 and failed.stdout == ""
    assert failed.stderr.startswith("error: ")


@pytest.mark.parametrize("args", [["extract", "--json"], ["edit", "p", "--json", "--bogus"],
                                  ["tune", "p", "--steps", "many", "--json"]])
def test_a_usage_error_with_json_prints_the_error_document(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "usage" and error["exit_code"] == 2
    assert error["message"] and f"vedit {args[0]} --help" in error["hint"]


NOT_UTF8 = b"caf\xe9".decode("utf-8", "surrogateescape")  # Latin-1 bytes, as argv brings them


@pytest.mark.parametrize(("args", "message"), [
    (["--guidance", "nan"], "--guidance nan is not a number from 0 up"),
    (["--guidance", "inf"], "--guidance inf is not a number from 0 up"),
    (["--seed", str(2**64)], "seeds go from 0 to 9223372036854775807"),
    (["--seed", str(2**63)], "seeds go from 0 to 9223372036854775807"),
    (["--seed", "-1"], "seeds go from 0 to"),
    (["--prompt", f"a {NOT_UTF8} is talking"], "The prompt is not valid UTF-8 (at character 6)"),
    (["-p", "a dog", "-p", NOT_UTF8], "Prompt 2 ('caf\\udce9') is not valid UTF-8"),
    (["--negative-prompt", NOT_UTF8], "The --negative-prompt is not valid UTF-8"),
])
def test_odd_edit_input_is_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    """Refused as bad input (exit 3) before the project is even looked at."""
    if "--prompt" not in args and "-p" not in args:
        args = ["--prompt", "a cat", *args]
    result = run("edit", tmp_path / "no-project", *args)
    assert result.exit_code == 3, result.stderr
    assert message in " ".join(result.stderr.split())


@pytest.mark.parametrize(("args", "message"), [
    (["--seed", str(2**64)], "seeds go from 0 to 9223372036854775807"),
    (["--prompt", NOT_UTF8], "The --prompt is not valid UTF-8"),
])
def test_odd_tune_input_is_bad_input(tmp_path: Path, clip_qcif: Path, args: list[str],
                                     message: str) -> None:
    if "--prompt" not in args:
        args = ["--prompt", "a man", *args]
    result = run("tune", clip_qcif, "--project", tmp_path / "p", *args)
    assert result.exit_code == 3, result.stderr
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("from_stdin", [False, True])
def test_a_prompts_file_not_in_utf8_names_its_line(tmp_path: Path, from_stdin: bool) -> None:
    data = b"a cat is talking\n# a comment\n" + b"a caf\xe9 is open\n"
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(data)
    where = "-" if from_stdin else str(prompts)
    result = runner.invoke(app, ["edit", str(tmp_path / "no-project"), "--prompts-file", where],
                           input=data if from_stdin else None)
    assert result.exit_code == 3, result.stderr
    name = "stdin" if from_stdin else str(prompts)
    assert f"Line 3 of --prompts-file {name} is not valid UTF-8." in " ".join(
        result.stderr.split())


def test_a_command_line_in_another_encoding_is_bad_input(tmp_path: Path) -> None:
    """The real thing: the bytes of a Latin-1 terminal on the command line of `vedit`."""
    done = subprocess.run([sys.executable, "-m", "vedit", "edit", str(tmp_path / "no-project"),
                           "--prompt", b"a caf\xe9"], capture_output=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert b"The prompt is not valid UTF-8 (at character 6)." in done.stderr
