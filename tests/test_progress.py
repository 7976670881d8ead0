"""What the progress bars say: an ETA for slow steps, speeds people read, counters that agree."""

from __future__ import annotations

import io
import re

import torch
from rich.console import Console

from vedit.progress import Reporter
from vedit.tune import speed_text
from vedit.windows import WindowProgress, _status, plan_windows, single_window


def test_a_bar_whose_steps_take_50_s_still_shows_its_eta() -> None:
    now = [0.0]
    console = Console(file=io.StringIO(), force_terminal=True, get_time=lambda: now[0])
    with Reporter(console).task("tuning", total=10) as task:
        for _ in range(3):
            now[0] += 50.0
            task.advance()
        assert task._progress is not None
        remaining = task._progress.tasks[0].time_remaining
    assert remaining is not None and abs(remaining - 7 * 50.0) < 1.0


def test_speeds_below_one_step_a_second_read_as_seconds_per_step() -> None:
    assert speed_text(2.314) == "2.31 it/s"
    assert speed_text(0.02) == "50 s/it"
    assert speed_text(0.4) == "2.5 s/it"


def test_the_edit_bar_has_one_counter_per_figure() -> None:
    latents = torch.zeros(1)
    one = single_window(8)
    assert _status(WindowProgress(1, latents), 5, one) == ""  # the bar's 1/5 says it all
    several = plan_windows(20, tuned_frames=8)
    assert len(several) > 1
    assert _status(WindowProgress(1, latents), 5, several) == \
        f"now step 2/5, window 1/{len(several)}"
    assert _status(WindowProgress(5, latents), 5, several) == ""


def _bar_at(width: int, description: str, total: float, done: float, status: str, *,
            in_bytes: bool = False) -> str:
    """The line a Reporter's bar shows on a terminal `width` columns wide, two updates in."""
    now = [0.0]
    console = Console(file=io.StringIO(), width=width, force_terminal=True,
                      get_time=lambda: now[0])
    with Reporter(console).task(description, total=total, in_bytes=in_bytes) as task:
        for part in (done / 2, done):
            now[0] += 10.0
            task.update(completed=part, status=status)
        assert task._progress is not None
        shown = io.StringIO()
        Console(file=shown, width=width, force_terminal=True, color_system=None).print(
            task._progress.get_renderable())
    [line] = shown.getvalue().splitlines()
    assert len(line) <= width
    assert re.search(r" eta \d+:\d\d:\d\d ", line), line
    return line


def test_the_tuning_bar_at_80_columns_keeps_step_loss_speed_memory_and_eta() -> None:
    status = f"loss 0.1234 · {speed_text(2.314)} · 79.3 GB"  # as tune's bar says it on a GPU
    line = _bar_at(80, "tuning", 5000, 1230, status)
    assert "tuning" in line and "1230/5000" in line and status in line


def test_the_edit_bar_at_80_columns_cuts_the_prompt_not_the_counts() -> None:
    plan = plan_windows(40, tuned_frames=8)
    status = _status(WindowProgress(1, torch.zeros(1)), 50, plan)
    label = f"sampling {'a panda is skiing on the beach, cartoon style'[:40]!r} (+3)"
    line = _bar_at(80, label, 50 * len(plan), 60, status)
    assert "sampling 'a panda" in line and "…" in line
    assert f"60/{50 * len(plan)}" in line and status in line


def test_a_download_bar_at_80_columns_counts_bytes_as_people_read_them() -> None:
    line = _bar_at(80, "Downloading CompVis/stable-diffusion-v1-4", 3_438_167_536,
                   1_234_567_890, "unet/diffusion_pytorch_model.fp16.safetensors", in_bytes=True)
    assert "1.2/3.4 GB" in line and "Downloading" in line
