"""The project folder: its paths, the `vedit.toml` record, atomic writes, the lock, cache keys.

Stages share nothing but this folder, and every name in it is spelled here:

    vedit.toml             the record: settings and results of each stage
    frames/00000.png ...   the tuned frames (extract)
    source/audio.m4a       the clip's sound, packets untouched (.mka where mp4 cannot hold them)
    latents/KEY.safetensors, inversions/KEY.safetensors   cached tensors (tune, edit)
    checkpoints/step-N/    tuning checkpoints (their files: checkpoints.py)
    logs/tune.jsonl        the loss of every tuning step
    edits/NAME/video.mp4   an edit (its other files: edit.py); remux adds final.mp4

Every write goes to a hidden temporary name first and is renamed into place, so an interrupted
stage never leaves a file a later stage would trust. A stage that writes holds the project lock
(`flock`, released by the kernel if the process dies).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vedit import __version__, tomlio
from vedit.errors import ProjectError, ProjectLockedError

#: Version of the folder layout and record; a project with a higher one is refused.
FORMAT = 1
#: Bump when frames for the same clip and settings would come out differently (extract's, and
#: `edit --full`'s span, which is decoded and sized alike).
FRAMES_VERSION = 1
RECORD_NAME = "vedit.toml"
LOCK_NAME = ".vedit.lock"
EDIT_VIDEO = "video.mp4"
EDIT_RECORD = "edit.toml"  # an edit's prompt, settings and scores
FINAL_VIDEO = "final.mp4"
_TMP_MARK = ".tmp-"
#: The lock files (resolved) of the projects `locked_early` holds in this process.
_HELD_EARLY: set[Path] = set()
_STEP_DIR = re.compile(r"^step-\d+$")


def frame_file(index: int) -> str:
    """The name of frame `index` in a folder of PNG frames: by name is in order."""
    return f"{index:05d}.png"


def cache_key(*parts: object) -> str:
    """A short stable hash of what a cached result was computed from."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def default_project_dir(clip: Path) -> Path:
    """Where a clip's project goes when none is named: beside it, `clip.vedit/`."""
    return Path(clip).with_suffix(".vedit")


def temp_beside(target: Path) -> Path:
    """A hidden name beside `target`, so the final rename stays on one file system."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}{_TMP_MARK}", dir=target.parent)
    os.close(fd)
    os.unlink(name)
    return Path(name)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_beside(target)
    try:
        yield temp
        _fsync(temp)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; it replaces folder `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_beside(target)
    temp.mkdir()
    try:
        yield temp
        old = temp_beside(target) if target.exists() else None
        if old is not None:
            os.replace(target, old)
        os.replace(temp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_file(target) as temp:
        temp.write_text(text, encoding="utf-8")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class Project:
    """A vedit project folder and its record. Open with `Project.open` or `Project.create`."""

    def __init__(self, root: Path, record: dict[str, Any]) -> None:
        self.root = root
        self.record = record
        self._lock_handle: Any = None

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path) -> Project:
        """Open an existing project; refuse what is not one, or one from a newer vedit."""
        root = Path(root)
        record_path = root / RECORD_NAME
        if not root.exists():
            raise ProjectError(f"Project {root} does not exist.",
                               f"Create it with `vedit extract CLIP -o {root}`.")
        if not record_path.is_file():
            raise ProjectError(f"{root} is not a vedit project (no {RECORD_NAME}).",
                               f"Create one with `vedit extract CLIP -o {root}`.")
        return cls(root, _read_record(record_path))

    @staticmethod
    def check_usable(root: Path) -> None:
        """Refuse early a folder that neither is a project nor could become one."""
        root = Path(root)
        if (root / RECORD_NAME).exists():
            Project.open(root)
        elif root.exists() and not root.is_dir():
            raise ProjectError(f"{root} is a file, not a project folder.", "Choose another -o.")
        elif root.exists() and any(root.iterdir()):
            raise ProjectError(f"{root} exists, is not empty and is not a vedit project.",
                               "Choose another -o, or empty that folder first.")

    @classmethod
    def create(cls, root: Path) -> Project:
        """Start a project in a new or empty folder."""
        root = Path(root)
        cls.check_usable(root)
        root.mkdir(parents=True, exist_ok=True)
        project = cls(root, {"format": FORMAT, "vedit": __version__, "created": _now()})
        project.save()
        return project

    @classmethod
    def open_or_create(cls, root: Path) -> Project:
        root = Path(root)
        if (root / RECORD_NAME).exists():
            return cls.open(root)
        return cls.create(root)

    # -- paths ---------------------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        return self.root / RECORD_NAME

    @property
    def frames_dir(self) -> Path:
        return self.root / "frames"

    @property
    def source_dir(self) -> Path:
        return self.root / "source"

    @property
    def edits_dir(self) -> Path:
        return self.root / "edits"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def loss_log(self) -> Path:
        return self.root / "logs" / "tune.jsonl"

    def frame_paths(self) -> list[Path]:
        """The tuned frames in order; raises ProjectError when extract has not run."""
        frames = self.require("frames", "extract")
        folder = self.inside(str(frames.get("dir", "frames")))
        return sorted(folder.glob("*.png"))

    def audio_path(self, suffix: str) -> Path:
        """Where the source's sound is kept, in a file of type `suffix` (`.m4a`, `.mka`)."""
        return self.source_dir / f"audio{suffix}"

    def audio_files(self) -> list[Path]:
        """Every kept sound file (one at most, unless an extract was cut short)."""
        return sorted(self.source_dir.glob("audio.*"))

    def source_audio(self) -> Path | None:
        """The project's copy of the source audio, as the record names it; None when silent."""
        name = (self.section("source") or {}).get("audio_file")
        return self.inside(name) if name else None

    def latents_file(self, key: str) -> Path:
        return self.root / "latents" / f"{key}.safetensors"

    def inversion_file(self, key: str) -> Path:
        return self.root / "inversions" / f"{key}.safetensors"

    def inversion_progress_file(self, key: str) -> Path:
        """Where an interrupted inversion keeps the work it finished."""
        return self.root / "inversions" / f"{key}.partial.safetensors"

    def checkpoint_dir(self, step: int | str) -> Path:
        return self.checkpoints_dir / f"step-{step}"

    def checkpoint_dirs(self) -> list[Path]:
        """The `step-N` folders under checkpoints/ (complete or not: the caller checks)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.iterdir() if _STEP_DIR.match(p.name))

    def edit_dir(self, name: str) -> Path:
        """edits/NAME/; a name that would leave the project is refused."""
        return self.inside(f"edits/{name}")

    def edit_names(self) -> list[str]:
        """Names of the finished edits (an edit folder appears whole, with its video)."""
        if not self.edits_dir.is_dir():
            return []
        return sorted(p.name for p in self.edits_dir.iterdir() if (p / EDIT_VIDEO).is_file())

    def inside(self, relative: str) -> Path:
        """Resolve a path read from the record; refuse one that leaves the project folder."""
        candidate = (self.root / relative).resolve()
        root = self.root.resolve()
        if candidate != root and root not in candidate.parents:
            raise ProjectError(f"{RECORD_NAME} names a path outside the project: {relative!r}.",
                               "The record was edited by hand; rerun the stage that wrote it.")
        return self.root / relative

    # -- the record ----------------------------------------------------------------------

    def section(self, name: str) -> dict[str, Any] | None:
        value = self.record.get(name)
        if value is not None and not isinstance(value, dict):
            raise ProjectError(f"{RECORD_NAME} has a malformed [{name}] section.",
                               "Rerun the stage that writes it.")
        return value

    def require(self, name: str, stage: str) -> dict[str, Any]:
        """A section a stage needs; a missing one names the command that writes it."""
        value = self.section(name)
        if value is None:
            raise ProjectError(f"Project {self.root} has no {name} yet.",
                               f"Run `vedit {stage}` on it first.")
        return value

    def save(self) -> None:
        self.record["vedit"] = __version__
        text = tomlio.dumps(self.record)
        write_text_atomic(self.record_path, text)

    # -- the lock ------------------------------------------------------------------------

    @contextmanager
    def lock(self, command: str) -> Iterator[Project]:
        """Hold the project's write lock for the block; a second vedit gets ProjectLockedError
        (a second lock in this process too, unless `locked_early` holds it for the block)."""
        lock_path = (self.root / LOCK_NAME).resolve()
        handle = None if lock_path in _HELD_EARLY else _acquire_lock(lock_path, command)
        try:
            if handle is not None:
                self._sweep_temporaries()
            # Another process may have written before we locked: start from its record.
            if self.record_path.exists():
                self.record = _read_record(self.record_path)
            yield self
        finally:
            if handle is not None:
                _release_lock(handle)

    def _sweep_temporaries(self) -> None:
        """Remove temporaries a killed vedit left behind (only the lock holder may)."""
        for path in self.root.rglob(f".*{_TMP_MARK}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextmanager
def locked_early(root: Path, command: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of the project at `root`, if there is one, for the block, and let the
    stage run in it take it again: the CLI's check, before anything heavy is imported or
    loaded, that no other vedit is writing there (not `enabled` in the other processes of
    `accelerate launch`: the first one locks for all)."""
    if not enabled or not (Path(root) / RECORD_NAME).is_file():
        yield
        return
    project = Project.open(root)
    with project.lock(command):
        lock_path = (project.root / LOCK_NAME).resolve()
        _HELD_EARLY.add(lock_path)
        try:
            yield
        finally:
            _HELD_EARLY.discard(lock_path)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = tomlio.loads(path.read_text(encoding="utf-8"))
    except (tomlio.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProjectError(
            f"{path} is not valid TOML ({exc}).",
            "Restore it from a backup or rerun `vedit extract` into a new project.") from exc
    version = record.get("format")
    if not isinstance(version, int):
        raise ProjectError(f"{path} has no valid format number.",
                           "It was not written by vedit, or was edited by hand.")
    if version > FORMAT:
        raise ProjectError(
            f"{path.parent} was written by a newer vedit (format {version}; "
            f"this vedit {__version__} reads format {FORMAT}).",
            "Upgrade vedit: pip install -U vedit.",
        )
    return record


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _acquire_lock(path: Path, command: str) -> Any:
    import fcntl

    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the lock's life
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another vedit process"
        handle.close()
        raise ProjectLockedError(
            f"Project {path.parent} is in use by {holder}.",
            "Wait for that command to finish, then rerun.",
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"`vedit {command}` (pid {os.getpid()} on {socket.gethostname()}, "
                 f"since {_now().isoformat()})")
    handle.flush()
    return handle


def _release_lock(handle: Any) -> None:
    import fcntl

    handle.seek(0)
    handle.truncate()
    handle.flush()
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    handle.close()
