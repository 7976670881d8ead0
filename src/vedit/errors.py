"""Typed errors: each kind carries a one-sentence message, a hint and its exit code.

Library code raises these; only the CLI prints them and exits. The exit codes below
are the documented contract (README.md, "Exit codes"); change them nowhere else.
"""

from __future__ import annotations

import errno
import sys


class VeditError(Exception):
    """Base of every error vedit reports to a user; `exit_code` is what the CLI exits with."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
        }


class UsageError(VeditError):
    """Options that cannot go together; the same code as Typer's own usage errors."""

    exit_code = 2
    kind = "usage"


class BadInputError(VeditError):
    """The clip, an option value or a config file cannot be used as given."""

    exit_code = 3
    kind = "bad_input"


class ProjectError(VeditError):
    """The project folder is missing, not a vedit project, from a newer vedit, or lacks a stage."""

    exit_code = 4
    kind = "project"


class ProjectLockedError(VeditError):
    """Another vedit process is writing to the same project."""

    exit_code = 5
    kind = "locked"


class ModelNotFoundError(VeditError):
    """The base model is not present locally and cannot be downloaded."""

    exit_code = 6
    kind = "missing_model"


class OutOfMemoryError(VeditError):
    """The device ran out of memory for the asked settings."""

    exit_code = 7
    kind = "out_of_memory"


class DiskError(VeditError):
    """A file could not be written (disk full, read-only folder, no permission)."""

    exit_code = 8
    kind = "disk"


class EnvironmentProblem(VeditError):
    """This machine lacks something vedit needs (a library, an encoder): `vedit doctor` says."""

    exit_code = 9
    kind = "environment"


class Interrupted(VeditError):
    """The user pressed Ctrl-C or the process got SIGTERM; finished work was kept."""

    exit_code = 130
    kind = "interrupted"


#: Every documented exit code, for the README table and `--help` text.
#: A reader closed stdout early (`vedit ... | head`): vedit stops quietly, as a Unix tool
#: killed by SIGPIPE does (128 + 13).
BROKEN_PIPE = 141

EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected failure (a bug: rerun with --debug and report it)",
    2: "usage error (unknown option, missing argument)",
    BadInputError.exit_code:
        "bad input: unreadable clip, impossible frame or size request, bad config",
    ProjectError.exit_code: "project problem: not a vedit project, newer format, missing stage",
    ProjectLockedError.exit_code: "project locked by another running vedit",
    ModelNotFoundError.exit_code: "model missing and not downloadable",
    OutOfMemoryError.exit_code: "out of GPU memory",
    DiskError.exit_code: "could not write: disk full or no permission",
    EnvironmentProblem.exit_code: "this machine lacks something vedit needs (see vedit doctor)",
    Interrupted.exit_code: "interrupted (Ctrl-C or SIGTERM); finished work was kept",
    BROKEN_PIPE: "stdout was closed early (a pipe into `head`): vedit stopped quietly",
}


def as_vedit_error(exc: BaseException) -> VeditError | None:
    """Translate a foreign exception that has a known meaning for users; None for real bugs."""
    if isinstance(exc, VeditError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted("Interrupted.", "Finished stages are kept; rerun the command to go on.")
    if is_out_of_memory(exc):
        return OutOfMemoryError(
            "The device ran out of memory.",
            "Try fewer frames (--frames), a smaller --size, or gradient checkpointing.",
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" at {exc.filename}" if exc.filename else ""
        return DiskError(f"The disk is full{where}.",
                         "Free some space and rerun; earlier results are kept.")
    if isinstance(exc, PermissionError):
        return DiskError(
            f"No permission to write {exc.filename or 'a file'}.",
            "Choose a folder you can write to.",
        )
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return DiskError(f"{exc.filename or 'The target'} is on a read-only file system.",
                         "Choose a folder you can write to.")
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed, on any device: torch's out-of-memory error
    (GPUs), its CPU allocator's RuntimeError, or Python's own MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # never imported: cannot be torch's out-of-memory error
    if torch is None:
        return False
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc)
                                           or "can't allocate memory" in str(exc)))
