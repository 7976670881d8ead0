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
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column

#: How far back a bar's speed (and so its ETA) looks. Rich's 30 s default shows no ETA at all
#: once one step takes longer, as a tuning step on the CPU or a big frame does.
SPEED_PERIOD = 15 * 60.0

#: The bar's own narrowest width, before the texts beside it are cut short.
BAR_MIN = 10
#: Widths of what is never cut: the spinner, "eta", the time left (up to 9:59:59),
#: the bytes counter ("123.4/567.8 MB") and the six spaces between the seven columns.
_SPINNER, _ETA, _TIME_LEFT, _BYTES, _GAPS = 1, 3, 7, 14, 6


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
    def task(self, description: str, total: float | None = None, *,
             in_bytes: bool = False) -> Iterator[Task]:
        """A transient progress bar for one step of a stage; `in_bytes` counts its `total` as
        bytes (1.2/3.4 GB)."""
        if self.console is None or not self.shows_progress:
            yield Task(None, None)
            return
        progress = Progress(
            *bar_columns(self.console.width, description, total, in_bytes=in_bytes),
            console=self.console,
            transient=True,
            speed_estimate_period=SPEED_PERIOD,
        )
        with progress:
            task_id = progress.add_task(description, total=total, status="")
            yield Task(progress, task_id)


def bar_columns(width: int, description: str, total: float | None, *,
                in_bytes: bool = False) -> list[ProgressColumn]:
    """A bar's columns fitted to `width` (80 included): the counter and the time left are
    never cut; the description (at most a quarter of the width) and the status after the bar
    (loss, speed, memory, window) end in "…" where they would leave the bar under BAR_MIN."""
    counted = _BYTES if in_bytes else 2 * len(f"{total:.0f}") + 1 if total else 3
    described = min(len(description), max(BAR_MIN, width // 4))
    stated = width - (_SPINNER + described + BAR_MIN + counted + _ETA + _TIME_LEFT + _GAPS)

    def whole() -> Column:
        return Column(no_wrap=True)

    def cut(most: int) -> Column:
        return Column(no_wrap=True, overflow="ellipsis", max_width=max(most, BAR_MIN))

    # The bar is the one column rich may narrow; every other one is sized above.
    return [SpinnerColumn(table_column=whole()),
            TextColumn("{task.description}", table_column=cut(described)),
            BarColumn(),
            DownloadColumn(table_column=whole()) if in_bytes
            else MofNCompleteColumn(table_column=whole()),
            TextColumn("eta", table_column=whole()),
            TimeRemainingColumn(table_column=whole()),
            TextColumn("{task.fields[status]}", table_column=cut(stated))]


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
