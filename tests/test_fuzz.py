"""Hundreds of damaged copies of a small clip through extract: a clean error or a result, never
a crash or a hang."""

from __future__ import annotations

import random
import shutil
import signal
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vedit.errors import VeditError
from vedit.extract import extract
from vedit.settings import ExtractSettings
from vedit.synthetic import make_clip

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


@pytest.mark.slow
def test_damaged_clips_give_a_clean_error_or_frames(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", width=64, height=48, fps=10, seconds=1.0)
    data = clip.read_bytes()
    rng = random.Random(20261126)
    outcomes = {"frames": 0, "clean error": 0}
    crashes = []
    for index in range(MUTATIONS):
        damaged, kind = mutate(data, rng)
        target = tmp_path / "damaged.mp4"
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
            assert not project.exists(), f"mutation {index} ({kind}) left a project behind"
        except Exception as exc:  # noqa: BLE001 - what the test is looking for
            crashes.append(f"mutation {index} ({kind}): {type(exc).__name__}: {exc}")
    assert not crashes, "\n".join(crashes[:10])
    assert outcomes["frames"] > 0 and outcomes["clean error"] > 0  # both kinds were exercised
