"""How a command talks to its user: result on stdout (human or `--json`), the rest on stderr.

`command_output` wraps one CLI command: it builds the Reporter for progress, turns every
error into one sentence plus a hint and the documented exit code (errors.py), and shows a
traceback only with `--debug` or `VEDIT_DEBUG=1`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from vedit.errors import VeditError, as_vedit_error
from vedit.progress import Reporter


class Output:
    """One command's output mode: human, `--json` or `--quiet`."""

    def __init__(self, *, json_mode: bool, quiet: bool, debug: bool) -> None:
        # Under `accelerate launch` / torchrun every process runs the command; only the first
        # one reports, so stdout still holds one result.
        self.secondary = os.environ.get("RANK", "0") not in ("", "0")
        self.json_mode = json_mode
        self.quiet = quiet or self.secondary
        self.debug = debug or os.environ.get("VEDIT_DEBUG", "") not in ("", "0")
        if not self.debug:  # the libraries' own chatter, read when they are first imported
            for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
                os.environ.setdefault(variable, "error")
        self.reporter = Reporter.for_cli(quiet=self.quiet)
        self.stderr = self.reporter.console
        self.stdout = Console(highlight=False, soft_wrap=True)

    def result(self, data: dict[str, Any], human: str) -> None:
        """The command's result: `data` as one JSON document, or `human` text."""
        if self.secondary:
            return
        if self.json_mode:
            print(json.dumps(data, indent=2, default=str), flush=True)
        elif not self.quiet:
            self.stdout.print(escape(human))

    def fail(self, error: VeditError) -> None:
        self.stderr.print(f"[bold red]error:[/bold red] {escape(error.message)}", soft_wrap=True)
        if error.hint:
            self.stderr.print(f"[dim]hint:[/dim] {escape(error.hint)}", soft_wrap=True)
        if self.json_mode:
            print(json.dumps({"error": error.to_dict()}, indent=2), flush=True)


@contextmanager
def command_output(*, json_mode: bool, quiet: bool, debug: bool) -> Iterator[Output]:
    """Run a command body; map whatever it raises to a message and an exit code."""
    output = Output(json_mode=json_mode, quiet=quiet, debug=debug)
    try:
        with _sigterm_as_interrupt():
            yield output
    except (typer.Exit, typer.Abort):
        raise
    except BaseException as exc:  # noqa: BLE001 - this is the one place errors are mapped
        error = as_vedit_error(exc)
        if output.debug and output.stderr is not None:
            output.stderr.print_exception(show_locals=False)
        if error is None:
            if isinstance(exc, SystemExit):
                raise
            error = VeditError(f"Unexpected {type(exc).__name__}: {exc}",
                               "This is a bug: rerun with --debug and report the traceback.")
        output.fail(error)
        raise typer.Exit(error.exit_code) from None


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so stages clean up and keep finished work either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

