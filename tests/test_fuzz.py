"""Damaged input, fuzzed: hundreds of damaged copies of a small clip (mp4, and fewer in other
containers) through extract; damaged project files under odd options through tune, edit, remux
and status. Each ends in a result or a clean error, never a crash or a hang."""

from __future__ import annotations

import random
import shutil
import signal
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from typer.testing import CliRunner, Result

from vedit import tomlio
from vedit.cli import app
from vedit.edit import edit
from vedit.errors import VeditError
from vedit.extract import extract
from vedit.project import EDIT_RECORD, EDIT_VIDEO, RECORD_NAME
from vedit.settings import EditSettings, ExtractSettings, TuneSettings
from vedit.synthetic import make_clip, pattern
from vedit.tune import tune

MUTATIONS = 400
SECONDS_EACH = 20  # far above the ~5 ms one takes: only a hang gets near it


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One damage a download or a disk can do: flipped bits, a cut, zeroed, repeated or lost
    bytes."""
    out = bytearray(data)
    kind = rng.choice(["flip", "cut", "zero", "repeat", "lose"])
    at = rng.randrange(len(out))
    if kind == "flip":
        for _ in range(rng.randint(1, 20)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "cut":
        del out[at:]
    elif kind == "zero":
        span = min(rng.randint(1, 200), len(out) - at)
        out[at:at + span] = bytes(span)
    elif kind == "repeat":
        out[rng.randrange(len(out)):rng.randrange(len(out))] = out[at:at + rng.randint(1, 300)]
    else:
        del out[at:at + rng.randint(1, 300)]
    return bytes(out), kind


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def hung(signum: int, frame: object) -> None:
        raise TimeoutError(f"extract took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def webm_clip(path: Path) -> Path:
    """A VP9 and Opus clip in WebM (make_clip writes H.264, which WebM cannot hold)."""
    width, height, count = 64, 48, 10
    with av.open(str(path), "w") as container:
        video = container.add_stream("libvpx-vp9", rate=10)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"deadline": "realtime", "cpu-used": "8"}
        sound = container.add_stream("libopus", rate=48000, layout="mono")
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(pattern(width, height, i, count), "rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        tone = (0.1 * np.sin(np.arange(48000) / 10)).astype(np.float32)
        for start in range(0, 48000, 960):
            block = av.AudioFrame.from_ndarray(tone[None, start:start + 960], format="flt",
                                               layout="mono")
            block.sample_rate, block.pts = 48000, start
            container.mux(sound.encode(block))
        container.mux(sound.encode())
    return path


#: Each container, and how many damaged copies of a clip in it extract is given.
CLIP_KINDS = {"mp4": MUTATIONS, "mkv": 20, "mov": 20, "ts": 20, "webm": 20}


@pytest.mark.slow
@pytest.mark.parametrize("kind", CLIP_KINDS)
def test_damaged_clips_give_a_clean_error_or_frames(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"clip.{kind}"
    clip = webm_clip(path) if kind == "webm" else make_clip(path, width=64, height=48, fps=10,
                                                            seconds=1.0)
    data = clip.read_bytes()
    rng = random.Random(f"20261126-{kind}")
    outcomes = {"frames": 0, "clean error": 0}
    crashes = []
    for index in range(CLIP_KINDS[kind]):
        damaged, how = mutate(data, rng)
        target = tmp_path / f"damaged.{kind}"
        target.write_bytes(damaged)
        project = tmp_path / "p"
        shutil.rmtree(project, ignore_errors=True)
        try:
            with deadline(SECONDS_EACH), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a damaged sound track warns, then goes silent
                extract(target, project, ExtractSettings(frames=3, size="64"))
            outcomes["frames"] += 1
        except VeditError:
            outcomes["clean error"] += 1
            assert not project.exists(), f"mutation {index} ({how}) left a project behind"
        except Exception as exc:  # noqa: BLE001 - what the test is looking for
            crashes.append(f"mutation {index} ({how}): {type(exc).__name__}: {exc}")
    assert not crashes, "\n".join(crashes[:10])
    assert outcomes["frames"] > 0 and outcomes["clean error"] > 0  # both kinds were exercised


# -- damaged projects under odd options, through the CLI ---------------------------------------

CASES = 12
ODD_VALUES: list[object] = ["x", "", -1, 0, 10**12, float("nan"), float("inf"), -float("inf"),
                            1e308, [], [1, "a"], {"a": 1}, True, "../../etc"]
STEPS = ["1", "2", "0", "-1", "", "nan", "1e3", "٣", "abc"]
RANKS = ["1", "4", "0", "-2", "1000000000", "x"]
NUMBERS = ["1e-4", "7.5", "0", "-1", "nan", "inf", "1e400", "", "\uff11"]  # a full-width 1


@pytest.fixture(scope="module")
def edited(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A project with every kind of file: frames, sound, latents, a checkpoint, an edit."""
    root = tmp_path_factory.mktemp("fuzz")
    clip = make_clip(root / "clip.mp4", width=96, height=64, fps=20, seconds=0.5)
    extract(clip, root / "p", ExtractSettings(frames=3, size="64"))
    tune(root / "p", TuneSettings(prompt="a square", model=str(tiny_model), steps=1,
                                  checkpoint_every=0, eval=False))
    edit(root / "p", ["a cat"], EditSettings(steps=1), name="cat")
    return root / "p"


def leaves(table: dict[str, Any], where: str = "") -> list[str]:
    """The dotted key of every value in a TOML table that is not itself a table."""
    found = []
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        found += leaves(value, name) if isinstance(value, dict) else [name]
    return found


def damage_toml(path: Path, rng: random.Random) -> str:
    record = tomlio.loads(path.read_text())
    where = rng.choice(leaves(record))
    *tables, key = where.split(".")
    table = record
    for name in tables:
        table = table[name]
    if rng.random() < 0.2:
        del table[key]
        value: object = "(removed)"
    else:
        value = table[key] = rng.choice(ODD_VALUES)
    path.write_text(tomlio.dumps(record))
    return f"{where} = {value!r}"


def damage_bytes(path: Path, rng: random.Random) -> str:
    damaged, how = mutate(path.read_bytes(), rng)
    path.write_bytes(damaged)
    return how


def damage(project: Path, rng: random.Random) -> str:
    """One damage to one of the project's files (or none), said in words."""
    step = project / "checkpoints" / "run-1" / "step-1"
    files = {"toml": [project / RECORD_NAME, step / "checkpoint.toml",
                      project / "edits" / "cat" / EDIT_RECORD],
             "bytes": [*project.glob("latents/*"), *project.glob("inversions/*"),
                       *step.glob("*.safetensors"), *project.glob("frames/*.png"),
                       project / "edits" / "cat" / EDIT_VIDEO, *project.glob("source/audio.*"),
                       project / "checkpoints" / "run-1" / "tune.jsonl"]}
    kind = rng.choice(["toml", "bytes", "none"])
    if kind == "none":
        return "undamaged"
    path = rng.choice(files[kind])
    how = (damage_toml if kind == "toml" else damage_bytes)(path, rng)
    return f"{path.relative_to(project)}: {how}"


def odd_command(project: Path, out: Path, rng: random.Random) -> list[str]:
    """A tune, edit, remux or status command on `project`; now and then an option with an odd
    value (mostly sound ones, so that the damage is read)."""
    def odd(values: list[str], usual: str) -> str:
        return rng.choice(values) if rng.random() < 0.2 else usual

    def maybe(option: str, values: list[str]) -> list[str]:
        return [option, rng.choice(values)] if rng.random() < 0.15 else []

    kind = rng.choice(["tune", "edit", "remux", "status"])
    if kind == "tune":
        return ["tune", str(project), "--prompt", odd(["", "x " * 200], "a square"),
                "--steps", odd(STEPS, "2"), "--no-eval", "-q",
                *(["--resume"] if rng.random() < 0.4 else []), *maybe("--rank", RANKS),
                *maybe("--lr", NUMBERS)]
    if kind == "edit":
        return ["edit", str(project), "-p", odd([""], "a dog"), "-q",
                "--steps", odd(STEPS[:6], "1"), *maybe("--guidance", NUMBERS),
                *maybe("--checkpoint", ["run-1/step-1", "step-9", "../x", ""]),
                *maybe("--name", ["cat", "../out", "", "a/b", "dog"]),
                *maybe("--formats", ["mp4", "gif,frames", "avi", ""]),
                *maybe("--seed", ["1", "-1", "x"])]
    if kind == "remux":
        video = str(project / "edits" / "cat" / EDIT_VIDEO)
        return rng.choice([["remux", str(project)], ["remux", str(project), "cat"],
                           ["remux", str(project), "nope"],
                           ["remux", str(project), "--video", video, "-o", str(out)],
                           ["remux", str(project), "--video", video, "-o", str(out.parent)],
                           ["remux", str(project), "--video", video, "-o", video]])
    return ["status", str(project), *(["--json"] if rng.random() < 0.5 else [])]


def unclean(result: Result) -> str | None:
    """What breaks the CLI's contract in a result, if anything: exit 0, or an error (exit 2-9)
    said in one `error:` line and its `hint:` (or, for a usage error Click finds, its message
    and `Try ... -h`); never exit 1 nor a traceback."""
    stderr = result.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback" in stderr or result.exit_code not in (0, 2, 3, 4, 5, 6, 7, 8, 9):
        return f"exit {result.exit_code}: {stderr[-1500:]}"
    said = (sum(line.startswith("error: ") for line in lines) == 1
            and lines[-1].startswith("hint: "))
    click = result.exit_code == 2 and "Try '" in stderr and "Error" in stderr
    if result.exit_code and not (said or click):
        return f"exit {result.exit_code} without one error and its hint: {stderr[-500:]}"
    return None


@pytest.mark.slow
def test_damaged_projects_and_odd_options_give_a_result_or_a_clean_error(
        tmp_path: Path, edited: Path) -> None:
    rng = random.Random(20261202)
    runner = CliRunner()
    problems, codes = [], []
    for index in range(CASES):
        project = tmp_path / f"p{index}"
        shutil.copytree(edited, project)
        how = damage(project, rng)
        args = odd_command(project, tmp_path / f"out{index}.mp4", rng)
        with deadline(120):
            result = runner.invoke(app, args)
        codes.append(result.exit_code)
        problem = unclean(result)
        if problem:
            problems.append(f"case {index} ({how}; vedit {' '.join(args[:1] + args[2:])}): "
                            f"{problem}")
        shutil.rmtree(project)
    assert not problems, "\n".join(problems)
    assert 0 in codes and len(set(codes)) > 2, codes  # results and several kinds of errors
