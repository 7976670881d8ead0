"""Progress bars and notices on stderr: rich on a terminal, silent when asked or piped.

Stages take a `Reporter` and never print themselves, so a Python caller gets silence by
default and the CLI decides how loud to be (human, `--quiet`, `--json`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: How far back a bar's speed (and so its ETA) looks. Rich's 30 s default shows no ETA at all
#: once one step takes longer, as a tuning step on the CPU or a big frame does.
SPEED_PERIOD = 15 * 60.0


class Task:
    """One running progress bar; `advance` and `update` are no-ops when progress is hidden."""

    def __init__(self, progress: Progress | None, task_id: TaskID | None) -> None:
        self._progress = progress
        self._task_id = task_id

    def advance(self, amount: float = 1.0) -> None:
        if self._progress is not None and self._task_id is not None:
            self._progress.advance(self._task_id, amount)

    def update(self, *, completed: float | None = None, total: float | None = None,
               description: str | None = None, status: str | None = None) -> None:
        """Move the bar; `status` is a short text shown after it (loss, speed, memory)."""
        if self._progress is None or self._task_id is None:
            return
        self._progress.update(self._task_id, completed=completed, total=total,
                              description=description)
        if status is not None:
            self._progress.update(self._task_id, status=status)


class Reporter:
    """Where stages send progress and notices. `Reporter()` prints nothing (warnings go to
    Python's `warnings`), which is what a library caller wants; the CLI passes a console."""

    def __init__(self, console: Console | None = None, *, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet

    @property
    def shows_progress(self) -> bool:
        return self.console is not None and not self.quiet and self.console.is_terminal

    def info(self, message: str) -> None:
        """A line worth knowing (what was reused, where files went); hidden by --quiet."""
        if self.console is not None and not self.quiet:
            self.console.print(escape(message), soft_wrap=True)

    def warn(self, message: str) -> None:
        """Something the user should act on; shown even with --quiet."""
        if self.console is None:
            warnings.warn(message, stacklevel=2)
        else:
            self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        """A transient progress bar for one step of a stage."""
        if not self.shows_progress:
            yield Task(None, None)
            return
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=True,
            speed_estimate_period=SPEED_PERIOD,
        )
        with progress:
            task_id = progress.add_task(description, total=total, status="")
            yield Task(progress, task_id)


@contextmanager
def quiet_library_progress() -> Iterator[None]:
    """Hide diffusers' and transformers' own tqdm bars while loading or saving models: vedit's
    progress goes through its Reporter, and stderr stays clean."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(lib, lib.is_progress_bar_enabled())
              for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in states:
            if enabled:
                lib.enable_progress_bar()
