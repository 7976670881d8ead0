"""What the progress bars say: an ETA for slow steps, speeds people read, counters that agree."""

from __future__ import annotations

import io

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
