"""`vedit` and `python -m vedit`: run the CLI.

SIGTERM is treated as Ctrl-C only here, when vedit runs as a program: stages then clean up and
keep finished work either way, and no interrupt ends in a traceback (importing torch takes
seconds). Called as a library (or under pytest), vedit leaves the process's signals alone.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

INTERRUPTED = 130  # errors.Interrupted.exit_code, without importing anything heavy first


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _unreported(done: SystemExit) -> bool:
    """Whether `done` ends an interrupt no one reported: Typer turns a Ctrl-C while it parses
    into a silent exit 130 (raised from the KeyboardInterrupt); a command's own interrupt is
    reported (output.py) and its exit raised from nothing."""
    seen: BaseException | None = done
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return False


def _report_interrupt() -> None:
    sys.stderr.write("error: Interrupted.\nhint: Nothing was changed; rerun the command.\n")


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # first thing: vedit's imports take seconds
    try:
        from vedit.cli import app

        app()
    except KeyboardInterrupt:
        _report_interrupt()
        sys.exit(INTERRUPTED)
    except SystemExit as done:
        if _unreported(done):
            _report_interrupt()
            sys.exit(INTERRUPTED)
        raise
    finally:
        # The command has ended (app() always exits): a Ctrl-C from now on changes nothing,
        # so it must not change the exit code either.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    main()
