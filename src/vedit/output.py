"""How a command talks to its user: result on stdout (human or `--json`), the rest on stderr.

`command_output` wraps one CLI command: it builds the Reporter for progress, turns every
error into one sentence plus a hint and the documented exit code (errors.py), and shows a
traceback only with `--debug` or `VEDIT_DEBUG=1`.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console, RenderableType
from rich.markup import escape

from vedit.errors import BROKEN_PIPE, VeditError, as_vedit_error
from vedit.progress import Reporter

Body = TypeVar("Body", bound=Callable[..., None])

#: The options every command takes, added by `with_output`.
OUTPUT_OPTIONS = [
    inspect.Parameter("json_", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")]),
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress or notices.")]),
    inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--debug", help="Show tracebacks (also VEDIT_DEBUG=1).")]),
]


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
        self.stderr = Console(stderr=True, highlight=False)
        self.reporter = Reporter(self.stderr, quiet=self.quiet)
        self.stdout = Console(highlight=False, soft_wrap=True)

    def result(self, data: dict[str, Any], human: str | RenderableType) -> None:
        """The command's result: `data` as one JSON document, or `human` text (or a rich table)."""
        if self.secondary:
            return
        if self.json_mode:
            print(json.dumps(data, indent=2, default=str), flush=True)
        elif not self.quiet:
            self.stdout.print(escape(human) if isinstance(human, str) else human)

    def fail(self, error: VeditError) -> None:
        self.stderr.print(f"[bold red]error:[/bold red] {escape(error.message)}", soft_wrap=True)
        if error.hint:
            self.stderr.print(f"[dim]hint:[/dim] {escape(error.hint)}", soft_wrap=True)
        if self.json_mode:
            print(json.dumps({"error": error.to_dict()}, indent=2), flush=True)


def with_output(body: Body) -> Body:
    """A command `body(out, ...)` as Typer sees it: `out` replaced by --json, --quiet and
    --debug (after the body's own options), and the body run under `command_output`."""

    @functools.wraps(body)
    def run(*args: Any, json_: bool, quiet: bool, debug: bool, **kwargs: Any) -> None:
        with command_output(json_mode=json_, quiet=quiet, debug=debug) as out:
            body(out, *args, **kwargs)

    own = list(inspect.signature(body, eval_str=True).parameters.values())[1:]
    signature = inspect.Signature([*own, *OUTPUT_OPTIONS])
    typed = cast(Any, run)  # Typer reads the options from these two attributes
    typed.__signature__ = signature
    typed.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return cast(Body, run)


@contextmanager
def command_output(*, json_mode: bool, quiet: bool, debug: bool) -> Iterator[Output]:
    """Run a command body; map whatever it raises to a message and an exit code."""
    output = Output(json_mode=json_mode, quiet=quiet, debug=debug)
    try:
        yield output
    except (typer.Exit, typer.Abort):
        raise
    except BrokenPipeError:
        # The reader is gone (`vedit doctor --json | head`): stop quietly, as a Unix tool does.
        # What is still buffered for stdout goes nowhere, so the exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(BROKEN_PIPE) from None
    except BaseException as exc:
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
