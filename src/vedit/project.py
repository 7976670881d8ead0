"""The project folder: its paths, the `vedit.toml` record, atomic writes, the lock, cache keys.

Stages share nothing but this folder, and every name in it is spelled here:

    vedit.toml             the record: settings and results of each stage
    frames/00000.png ...   the tuned frames (extract)
    source/audio.m4a       the clip's sound, packets untouched (.mka where mp4 cannot hold them)
    frames.new/, source/audio.new.m4a   a new extract's frames and sound, only for as long as
                           it takes to put them in place (see extract.py)
    latents/KEY.safetensors, inversions/KEY.safetensors   cached tensors (tune, edit)
    checkpoints/RUN/step-N/  tuning checkpoints, one folder per tuning run (run-1, run-2, ...;
                           their files: checkpoints.py), RUN/tune.jsonl the loss of each step
    checkpoints/step-N/, logs/tune.jsonl   the same, in a project tuned before runs were kept
    edits/NAME/video.mp4   an edit (its other files: edit.py); remux adds final.mp4

Every write goes to a hidden temporary name first and is renamed into place, so an interrupted
stage never leaves a file a later stage would trust. A stage that writes holds the project lock
(`flock`, released by the kernel if the process dies).

A project may come from someone else (a copy, an archive): no path in it is followed through a
symbolic link, since a link could make vedit write, or read, anywhere. Every path here is built
by `Project.path`, which refuses one with a link (or a `..`) on its way; the files vedit opens in
place (the lock, the loss log) are opened with O_NOFOLLOW, and every other write is a rename,
which replaces a link instead of following it.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vedit import __version__, schema, tomlio
from vedit.errors import ProjectError, ProjectLockedError
from vedit.settings import MAX_SIDE, MIN_SIDE, ExtractSettings, TuneSettings

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
#: The record's sections each stage writes anew: opened by that stage, a damaged one of them is
#: dropped rather than refused, so rerunning the stage repairs it.
EXTRACT_SECTIONS = ("extract", "source", "frames")
FRAMES_DIR = "frames"
#: Marks the frames and sound a new extract has written beside the old ones: the record names
#: them as soon as it describes them, before they are moved to their usual names.
NEW_MARK = ".new"
TUNE_SECTIONS = ("tune",)
#: The lock files (resolved) of the projects `locked_early` holds in this process.
_HELD_EARLY: set[Path] = set()
#: The names vedit keeps at a project's top; none may be a symbolic link.
_TOP_NAMES = (RECORD_NAME, LOCK_NAME, FRAMES_DIR, FRAMES_DIR + NEW_MARK, "source", "latents",
              "checkpoints", "logs", "inversions", "edits")
_STEP_DIR = re.compile(r"^step-\d+$")
_RUN_DIR = re.compile(r"^run-(\d+)$")
#: The run of a project tuned before runs were kept: its checkpoints lie in checkpoints/ itself.
FLAT_RUN = ""


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

    def __init__(self, root: Path, record: dict[str, Any],
                 replacing: Collection[str] = ()) -> None:
        self.root = root
        self.record = record
        self._replacing = tuple(replacing)  # the sections this opener writes anew

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, *, replacing: Collection[str] = ()) -> Project:
        """Open an existing project; refuse what is not one, or one from a newer vedit, or
        a damaged record (but for the sections in `replacing`, which the caller writes anew:
        a damaged one is dropped, so rerunning the stage that writes it repairs it)."""
        root = Path(root)
        record_path = root / RECORD_NAME
        if not root.exists():
            raise ProjectError(f"Project {root} does not exist.",
                               f"Create it with `vedit extract CLIP -o {root}`.")
        if not record_path.is_file():
            raise ProjectError(f"{root} is not a vedit project (no {RECORD_NAME}).",
                               f"Create one with `vedit extract CLIP -o {root}`.")
        project = cls(root, {}, replacing)
        for name in _TOP_NAMES:  # refused at once, whatever the command would touch
            project.path(name)
        project.record = _read_record(record_path, replacing)
        return project

    @staticmethod
    def check_usable(root: Path, *, replacing: Collection[str] = ()) -> None:
        """Refuse early a folder that neither is a project nor could become one."""
        root = Path(root)
        if (root / RECORD_NAME).exists():
            Project.open(root, replacing=replacing)
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
    def open_or_create(cls, root: Path, *, replacing: Collection[str] = ()) -> Project:
        root = Path(root)
        if (root / RECORD_NAME).exists():
            return cls.open(root, replacing=replacing)
        return cls.create(root)

    # -- paths ---------------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        """The path `parts` inside the project, refused (ProjectError) where it would leave the
        folder or pass through a symbolic link: a project never sends a write elsewhere."""
        path = self.root.joinpath(*parts)
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            relative = None
        if relative is None or ".." in relative.parts:
            raise ProjectError(f"{RECORD_NAME} names a path outside the project: "
                               f"{'/'.join(parts)!r}.",
                               "The record was edited by hand; rerun the stage that wrote it.")
        current = self.root
        for part in relative.parts:
            current = current / part
            if current.is_symlink():
                raise ProjectError(f"{current} is a symbolic link; vedit does not follow links "
                                   "inside a project.",
                                   "Replace the link by the real file or folder (or remove it), "
                                   "then rerun.")
        return path

    @property
    def record_path(self) -> Path:
        return self.path(RECORD_NAME)

    @property
    def frames_dir(self) -> Path:
        """Where the frames usually are (the record's `frames.dir` says where they are now)."""
        return self.path(FRAMES_DIR)

    @property
    def new_frames_dir(self) -> Path:
        return self.path(FRAMES_DIR + NEW_MARK)

    def frames_folder(self) -> Path:
        """The folder the record's frames are in; raises ProjectError when extract has not run."""
        frames = self.require("frames", "extract")
        return self.inside(str(frames.get("dir", FRAMES_DIR)))

    @property
    def source_dir(self) -> Path:
        return self.path("source")

    @property
    def edits_dir(self) -> Path:
        return self.path("edits")

    @property
    def checkpoints_dir(self) -> Path:
        return self.path("checkpoints")

    def loss_log(self, run: str) -> Path:
        """The loss of every step of a tuning run."""
        if run == FLAT_RUN:
            return self.path("logs", "tune.jsonl")
        return self.path(*self._run_parts(run), "tune.jsonl")

    def frame_paths(self) -> list[Path]:
        """The tuned frames in order; raises ProjectError when extract has not run."""
        folder = self.frames_folder()
        return [self.path(*p.relative_to(self.root).parts) for p in sorted(folder.glob("*.png"))]

    def audio_path(self, suffix: str, *, new: bool = False) -> Path:
        """Where the source's sound is kept, in a file of type `suffix` (`.m4a`, `.mka`); `new`:
        where a new extract puts it beside the old."""
        return self.path("source", f"audio{NEW_MARK if new else ''}{suffix}")

    def audio_files(self) -> list[Path]:
        """Every kept sound file (one at most, unless an extract was cut short)."""
        return sorted(self.source_dir.glob("audio.*"))

    def source_audio(self) -> Path | None:
        """The project's copy of the source audio, as the record names it; None when silent."""
        name = (self.section("source") or {}).get("audio_file")
        return self.inside(name) if name else None

    def latents_file(self, key: str) -> Path:
        return self.path("latents", f"{key}.safetensors")

    def inversion_file(self, key: str) -> Path:
        return self.path("inversions", f"{key}.safetensors")

    def inversion_progress_file(self, key: str) -> Path:
        """Where an interrupted inversion keeps the work it finished."""
        return self.path("inversions", f"{key}.partial.safetensors")

    @staticmethod
    def run_name(number: int) -> str:
        return f"run-{number}"

    @staticmethod
    def run_number(run: str) -> int:
        """The number of a run's name; 0 for the flat run of an older project."""
        match = _RUN_DIR.match(run)
        return int(match.group(1)) if match else 0

    @staticmethod
    def _run_parts(run: str) -> tuple[str, ...]:
        return ("checkpoints", run) if run != FLAT_RUN else ("checkpoints",)

    def run_dir(self, run: str) -> Path:
        return self.path(*self._run_parts(run))

    def checkpoint_dir(self, run: str, step: int) -> Path:
        return self.path(*self._run_parts(run), f"step-{step}")

    @staticmethod
    def checkpoint_name(run: str, step: int) -> str:
        """How commands and the record name a checkpoint: `RUN/step-N` (`step-N` in the flat run
        of an older project)."""
        return f"{run}/step-{step}" if run != FLAT_RUN else f"step-{step}"

    def run_names(self) -> list[str]:
        """The tuning runs' folders under checkpoints/, oldest first (FLAT_RUN first, where an
        older project has checkpoints right in checkpoints/). A run folder that is a link is
        refused when it is listed."""
        folder = self.checkpoints_dir
        if not folder.is_dir():
            return []
        runs = sorted((p.name for p in folder.iterdir()
                       if _RUN_DIR.match(p.name) and (p.is_dir() or p.is_symlink())),
                      key=self.run_number)
        return ([FLAT_RUN] if self.checkpoint_dirs(FLAT_RUN) else []) + runs

    def checkpoint_dirs(self, run: str) -> list[Path]:
        """A run's `step-N` folders (complete or not: the caller checks); one that is a link is
        refused."""
        folder = self.run_dir(run)
        if not folder.is_dir():
            return []
        return sorted(self.path(*self._run_parts(run), p.name) for p in folder.iterdir()
                      if _STEP_DIR.match(p.name))

    def edit_dir(self, name: str) -> Path:
        """edits/NAME/; a name that would leave the project is refused."""
        return self.inside(f"edits/{name}")

    def edit_file(self, name: str, file: str) -> Path:
        """A file of edits/NAME/ (`EDIT_VIDEO`, `FINAL_VIDEO`...), never through a link."""
        return self.path("edits", name, file)

    def edit_names(self) -> list[str]:
        """Names of the finished edits (an edit folder appears whole, with its video)."""
        folder = self.edits_dir
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir()
                      if self.edit_file(p.name, EDIT_VIDEO).is_file())

    def inside(self, relative: str) -> Path:
        """A path read from the record, checked as `path` checks (inside, no link)."""
        if Path(relative).is_absolute():
            return self.path(str(Path(relative)))  # refused: it is not under the root
        return self.path(*Path(relative).parts)

    # -- the record ----------------------------------------------------------------------

    def section(self, name: str) -> dict[str, Any] | None:
        """A section of the record (checked when read: see RECORD_SECTIONS), or None."""
        value: dict[str, Any] | None = self.record.get(name)
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
        lock_path = self.path(LOCK_NAME)  # never through a symbolic link
        held = lock_path.resolve() in _HELD_EARLY
        handle = None if held else _acquire_lock(lock_path, command)
        try:
            if handle is not None:
                self._sweep_temporaries()
            # Another process may have written before we locked: start from its record.
            if self.record_path.exists():
                self.record = _read_record(self.record_path, self._replacing)
            yield self
        finally:
            if handle is not None:
                _release_lock(handle)

    def _sweep_temporaries(self) -> None:
        """Remove temporaries a killed vedit left behind (only the lock holder may)."""
        for path in self.root.rglob(f".*{_TMP_MARK}*"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextmanager
def locked_early(root: Path, command: str, *, enabled: bool = True,
                 replacing: Collection[str] = ()) -> Iterator[None]:
    """Hold the lock of the project at `root`, if there is one, for the block, and let the
    stage run in it take it again: the CLI's check, before anything heavy is imported or
    loaded, that no other vedit is writing there (not `enabled` in the other processes of
    `accelerate launch`: the first one locks for all). `replacing`: as for `Project.open`."""
    if not enabled or not (Path(root) / RECORD_NAME).is_file():
        yield
        return
    project = Project.open(root, replacing=replacing)
    with project.lock(command):
        lock_path = (project.root / LOCK_NAME).resolve()
        _HELD_EARLY.add(lock_path)
        try:
            yield
        finally:
            _HELD_EARLY.discard(lock_path)


def _frames_agree(frames: dict[str, Any]) -> str | None:
    lengths = {len(frames["times"]), len(frames["source_indices"]), frames["count"]}
    if len(lengths) > 1:
        return "count, times and source_indices disagree"
    if frames["times"] != sorted(frames["times"]) or (
            frames["source_indices"] != sorted(frames["source_indices"])):
        return "times or source_indices go backwards"
    return None


_SIDE = schema.integer(MIN_SIDE, MAX_SIDE)
#: What each stage's section of the record must hold, checked when the record is read, so a
#: hand-edited or damaged record fails at once with the key that is wrong (exit 4).
RECORD_SECTIONS: dict[str, schema.Check] = {
    "extract": schema.settings_of(ExtractSettings),
    "source": schema.table({
        "path": schema.text(), "sha256": schema.text(r"[0-9a-f]{64}"),
        "size_bytes": schema.integer(0), "duration": schema.number(0),
        "video": schema.table({"width": schema.integer(1), "height": schema.integer(1),
                               "fps": schema.number(above=0), "frame_count": schema.integer(1)},
                              required=("frame_count",)),
        "audio": schema.table({"offset": schema.number(), "duration": schema.number(0),
                               "sample_rate": schema.integer(0), "channels": schema.integer(0)}),
        "audio_file": schema.text(r"source/audio(\.new)?\.[a-z0-9]+"),
    }, required=("path", "sha256", "duration", "video")),
    "frames": schema.table({
        "key": schema.text(), "count": schema.integer(1), "width": _SIDE, "height": _SIDE,
        "interval": schema.number(above=0), "fps": schema.number(above=0),
        "times": schema.items(schema.number(0), at_least=1),
        "source_indices": schema.items(schema.integer(0), at_least=1),
        "dir": schema.text(r"[A-Za-z0-9_][\w.-]*"), "seconds": schema.number(0),
    }, required=("key", "count", "width", "height", "interval", "times", "source_indices"),
        rule=_frames_agree),
    "tune": schema.table({"settings": schema.settings_of(TuneSettings),
                          "last_step": schema.integer(0), "checkpoint": schema.text()}),
}
#: The command that writes each section, for the hint of a damaged one.
_WRITER = {"extract": "extract", "source": "extract", "frames": "extract", "tune": "tune"}


def _frames_in_source(record: dict[str, Any]) -> None:
    """The frames must be frames of the source: a time or index past its end is damage."""
    frames, source = record.get("frames"), record.get("source")
    if frames is None or source is None:
        return
    if frames["times"][-1] > source["duration"]:
        raise schema.Invalid("frames.times", frames["times"][-1],
                             f"after the source's end, {source['duration']:g} s")
    if frames["source_indices"][-1] >= source["video"]["frame_count"]:
        raise schema.Invalid("frames.source_indices", frames["source_indices"][-1],
                             f"past the source's {source['video']['frame_count']} frames")


def _read_record(path: Path, replacing: Collection[str] = ()) -> dict[str, Any]:
    """The record at `path`, checked; a damaged section in `replacing` (those the caller is
    about to write anew) is dropped rather than refused, so rerunning its stage repairs it."""
    try:
        record = tomlio.loads(path.read_text(encoding="utf-8"))
    except (tomlio.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProjectError(
            f"{path} is not valid TOML ({exc}).",
            "Restore it from a backup or rerun `vedit extract` into a new project.") from exc
    version = record.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ProjectError(f"{path} has no valid format number.",
                           "It was not written by vedit, or was edited by hand.")
    if version > FORMAT:
        raise ProjectError(
            f"{path.parent} was written by a newer vedit (format {version}; "
            f"this vedit {__version__} reads format {FORMAT}).",
            "Upgrade vedit: pip install -U vedit.",
        )
    while True:
        try:
            for name, check in RECORD_SECTIONS.items():
                if name in record:
                    check(record[name], name)
            _frames_in_source(record)
            return record
        except schema.Invalid as exc:
            section = re.split(r"[.\[]", exc.where)[0]
            if section in replacing and section in record:
                del record[section]
                continue
            stage = _WRITER[section]
            raise ProjectError(f"{path} holds a bad value: {exc}.",
                               f"It was edited by hand or damaged: restore it, or rerun "
                               f"`vedit {stage}` (and the stages after it).") from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def open_no_follow(path: Path, flags: int) -> int:
    """`os.open` a regular file of a project in place, never through a link (the lock, the loss
    log: the files vedit does not replace by a rename); anything else is a ProjectError."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        fd = -1
    if fd >= 0 and stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    if fd >= 0:
        os.close(fd)
    raise ProjectError(f"{path} is a symbolic link or not a regular file; vedit does not "
                       "follow links inside a project.",
                       "Remove it (vedit makes it again), then rerun.")


def _acquire_lock(path: Path, command: str) -> Any:
    import fcntl

    fd = open_no_follow(path, os.O_RDWR | os.O_CREAT)
    handle = os.fdopen(fd, "r+", encoding="utf-8")  # held for the lock's life
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
