"""The Hugging Face hub: fetch a base model or a scoring CLIP into the standard cache, list
what is cached.

This is the only module that talks to the network, with short timeouts and resumable
transfers: only the files vedit loads are downloaded (a pipeline's safetensors weights,
configs and tokenizer, never pickles or the safety checker; a CLIP's config, safetensors and
processor), small files first so an unusable model is refused before its weights. Failures
become ModelNotFoundError naming the next step.

The files land in huggingface_hub's own cache layout (`blobs/ID`, `snapshots/COMMIT/NAME`,
`refs/REVISION`), so every tool that reads that cache finds them. What huggingface_hub's
`hf_hub_download` does not do, this does: keep a partial file across failed runs, stop a
transfer that stalls, and name cache paths only after checking the server's data (a commit is
40 hex digits, a content id 40 or 64, a file name plain parts): `hf_hub_download` builds the
blob's path from the ETag as served, so a hostile mirror could make it write anywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from vedit.clip_models import (
    PROCESSOR_REPOS,
    check_clip_config,
    inspect_clip,
    is_clip_folder,
    resolve_clip,
    select_clip_files,
    select_processor_files,
)
from vedit.errors import BadInputError, DiskError, ModelNotFoundError
from vedit.model_files import (
    COMPONENTS,
    DEFAULT_MODEL,
    SDXL_EXTRA_COMPONENTS,
    WEIGHT_NAME,
    WEIGHTED_COMPONENTS,
    CachedModel,
    check_is_sd_unet,
    choose_weight_files,
    has_tokenizer_files,
    hub_cache_dir,
    inspect_model_folder,
)
from vedit.models import as_repo_id, resolve_model
from vedit.progress import Reporter, Task
from vedit.single_file import converted_models, resolve_single_file

# --- environment and errors -----------------------------------------------------------------


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as set since."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


#: A transfer that brings fewer bytes than this within the download timeout has stalled.
STALL_BYTES = 64 * 1024
#: Dropped connections resumed within one call, as huggingface_hub's `http_get` does.
RESUMES = 5
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CONTENT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # git blob sha1, or LFS sha256


def _download_timeout() -> float:
    """Seconds a transfer may go without STALL_BYTES (HF_HUB_DOWNLOAD_TIMEOUT, 10 s)."""
    from huggingface_hub import constants

    return float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or constants.HF_HUB_DOWNLOAD_TIMEOUT)


def _metadata_timeout() -> float:
    """Seconds to wait for the hub's answer to a metadata call (HF_HUB_ETAG_TIMEOUT, 10 s)."""
    from huggingface_hub import constants

    return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or constants.HF_HUB_ETAG_TIMEOUT)


def _offline_error(repo_id: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{repo_id} is not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1).",
        f"On a machine with network run `HF_HUB_OFFLINE=0 vedit fetch-models {repo_id}`, or copy "
        "a Hugging Face cache that has it into HF_HOME.")


@contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub and network failures into ModelNotFoundError with the next step."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = hub_endpoint()
    retry = (f"Rerun `vedit fetch-models {repo_id}`: finished files are kept and a partial one "
             "resumes where it stopped.")
    try:
        yield
    except OfflineModeIsEnabled:
        raise _offline_error(repo_id) from None
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo_id} is gated on {endpoint}: its license must be accepted.",
                                 "Accept it on the model's page, then log in with `hf auth login` "
                                 "and rerun.") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo_id} has no such revision on {endpoint}.",
                                 "Check --revision (a branch, tag or commit hash).") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"There is no model {repo_id} on {endpoint}.",
                                 "Check the id (`org/name`); log in with `hf auth login` if it is "
                                 "private.") from None
    except RemoteEntryNotFoundError as error:
        raise ModelNotFoundError(f"A file of {repo_id} vanished from {endpoint} during the "
                                 f"download ({error}).", retry) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise ModelNotFoundError(f"{endpoint} answered HTTP {status} while fetching {repo_id}.",
                                 retry) from None
    except HTTPError as error:
        raise ModelNotFoundError(f"Could not reach {endpoint} to fetch {repo_id} "
                                 f"({type(error).__name__}).",
                                 f"Check the network or proxy. {retry} Without network, set "
                                 "HF_HUB_OFFLINE=1 and use a cached model "
                                 "(`vedit fetch-models --list`).") from None


# --- fetching -------------------------------------------------------------------------------


def fetch_model(model: str | Path = DEFAULT_MODEL, *, revision: str | None = None,
                variant: str | None = None, reporter: Reporter | None = None,
                configs_only: bool = False) -> Path:
    """Make `model` available locally and return its folder: download a hub repo's pipeline
    files (safetensors only; the `variant` files where the repo has them) or, for a CLIP repo,
    its config, safetensors and processor (and those of the processor it was trained with) into
    the HF cache, resuming partial files; validate a local folder; convert a single-file
    checkpoint.

    `configs_only`: a hub pipeline repo's configs and tokenizer only (a few kB), enough to
    predict the memory of a run before downloading the weights."""
    reporter = reporter or Reporter()
    path = Path(model).expanduser()
    if path.is_file():
        fetch_configs = partial(_fetch_config_files, reporter=reporter)
        return resolve_single_file(path.resolve(), variant=variant, reporter=reporter,
                                   fetch_configs=fetch_configs).path
    if path.is_dir():
        return resolve_model(path, variant=variant, configs_only=configs_only).path
    repo_id = as_repo_id(str(model))
    if hub_offline():
        return _cached_offline(repo_id, revision, variant, configs_only)
    select = partial(_select_config_files if configs_only else select_repo_files, repo_id,
                     variant=variant)
    snapshot = _download_repo_files(repo_id, revision, select, reporter, check=_check_snapshot)
    if not is_clip_folder(snapshot):
        inspect_model_folder(snapshot, variant=variant, configs_only=configs_only)
        return snapshot
    processor = None
    if repo_id in PROCESSOR_REPOS:
        processor_repo = PROCESSOR_REPOS[repo_id]
        processor = _download_repo_files(processor_repo, None,
                                         partial(select_processor_files, processor_repo),
                                         reporter)
    inspect_clip(repo_id, snapshot, processor)
    return snapshot


def _cached_offline(repo_id: str, revision: str | None, variant: str | None,
                    configs_only: bool = False) -> Path:
    """A cached pipeline or CLIP, found without the network."""
    try:
        return resolve_model(repo_id, revision=revision, variant=variant,
                             configs_only=configs_only).path
    except ModelNotFoundError:
        pass
    try:
        return resolve_clip(repo_id).path
    except ModelNotFoundError:
        raise _offline_error(repo_id) from None


def select_repo_files(repo_id: str, repo_files: Iterable[str], *,
                      variant: str | None = None) -> list[str]:
    """What to fetch from a repo: a diffusers pipeline's files, or a CLIP model's."""
    files = set(repo_files)
    if "model_index.json" not in files and "config.json" in files:
        return select_clip_files(repo_id, files)
    return select_pipeline_files(repo_id, files, variant=variant)


def _check_snapshot(snapshot: Path) -> None:
    """Refuse, from its configs alone, a pipeline that isn't SD 1.x/2.x or SDXL, or a model not
    CLIP."""
    if is_clip_folder(snapshot):
        check_clip_config(snapshot)
    else:
        check_is_sd_unet(snapshot)


def _fetch_config_files(repo_id: str, hint: str, *, reporter: Reporter) -> Path:
    """Download what a single-file conversion borrows from a pipeline repo (`FetchConfigs`)."""
    if hub_offline():
        raise ModelNotFoundError("Converting a single-file checkpoint needs diffusers configs, "
                                 "none is cached and offline mode is on (HF_HUB_OFFLINE=1).", hint)
    return _download_repo_files(repo_id, None, partial(_select_config_files, repo_id), reporter)


def select_pipeline_files(repo_id: str, repo_files: Iterable[str], *,
                          variant: str | None = None) -> list[str]:
    """The files of a hub repo the pipeline needs: model_index.json, each component's configs
    and tokenizer files, one set of safetensors weights; never .bin/.ckpt or the safety checker."""
    files = set(repo_files)
    if "model_index.json" not in files:
        raise BadInputError(f"{repo_id} is not a diffusers pipeline repo (no model_index.json).",
                            "Pick a Stable Diffusion 1.x/2.x or SDXL repo in diffusers format "
                            "(or a CLIP model for scoring).")
    chosen = ["model_index.json"]
    sdxl = any(f.startswith("text_encoder_2/") for f in files)  # checked by its UNet's config
    for name in COMPONENTS + (SDXL_EXTRA_COMPONENTS if sdxl else ()):
        inside = sorted(f.split("/", 1)[1] for f in files
                        if f.startswith(f"{name}/") and f.count("/") == 1)
        chosen += [f"{name}/{f}" for f in inside if f.endswith((".json", ".txt"))]
        _check_remote_component(repo_id, name, inside, variant)
        if name in WEIGHTED_COMPONENTS:
            chosen += [f"{name}/{f}" for f in choose_weight_files(inside, variant)[1]]
    return chosen


def _check_remote_component(repo_id: str, name: str, inside: list[str],
                            variant: str | None) -> None:
    if name.startswith("tokenizer"):
        ok, detail = has_tokenizer_files(inside), "no tokenizer files"
    elif name == "scheduler":
        ok, detail = "scheduler_config.json" in inside, "no scheduler_config.json"
    elif "config.json" not in inside:
        ok, detail = False, "no config.json"
    else:
        ok = bool(choose_weight_files(inside, variant)[1])
        detail = "no .safetensors weights (vedit loads safetensors only, never pickle)"
    if not ok:
        raise BadInputError(f"{repo_id} cannot be used: its {name}/ has {detail}.",
                            "Pick a Stable Diffusion 1.x/2.x or SDXL repo in diffusers format "
                            "with safetensors weights.")


def _select_config_files(repo_id: str, repo_files: Iterable[str], *,
                         variant: str | None = None) -> list[str]:
    """Only the configs and tokenizer of a pipeline repo: what a single-file conversion or a
    memory prediction needs."""
    return [f for f in select_pipeline_files(repo_id, repo_files, variant=variant)
            if not f.endswith(".safetensors")]


# --- resumable downloads into the HF cache --------------------------------------------------


@dataclass(frozen=True)
class _RemoteFile:
    """A file in a hub listing: its size and content id (LFS sha256, else git blob sha1)."""

    name: str
    size: int
    content_id: str | None


def _download_repo_files(repo_id: str, revision: str | None,
                         select: Callable[[Iterable[str]], list[str]], reporter: Reporter, *,
                         check: Callable[[Path], object] | None = None) -> Path:
    """Download the files `select` picks from the repo's listing at one commit into the HF cache,
    small files first so `check` can refuse the model before the weights; point refs/REVISION at
    the commit only once every file is in. Returns the snapshot folder."""
    from huggingface_hub import HfApi

    revision = revision or "main"
    with _hub_errors(repo_id):
        info = HfApi(endpoint=hub_endpoint()).model_info(
            repo_id, revision=revision, files_metadata=True, timeout=_metadata_timeout())
        commit = _checked(info.sha, _COMMIT, repo_id, "commit")
        listing = {s.rfilename: _remote_file(s, repo_id) for s in info.siblings or []}
        files = [listing[name] for name in select(listing)]
        storage = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
        snapshot = storage / "snapshots" / commit
        missing = [f for f in files if not _blob(storage, f.content_id).is_file()]
        _check_free_space(storage, sum(f.size - _partial_size(_blob(storage, f.content_id))
                                       for f in missing))
        with reporter.task(f"Downloading {repo_id}", total=sum(f.size for f in files),
                           in_bytes=True) as task:
            task.advance(sum(f.size for f in files if f not in missing))
            for weights in (False, True):
                if weights and check is not None:
                    check(snapshot)
                for remote in files:
                    if remote.name.endswith(".safetensors") == weights:
                        task.update(status=remote.name)
                        _download_file(repo_id, remote, commit, storage, task)
    _write_ref(storage, revision, commit)
    return snapshot


def _checked(value: str | None, form: re.Pattern[str], repo_id: str, what: str) -> str:
    """`value` from the server if it has the form it must have; else the server is not to be
    trusted with naming files in the cache."""
    if value is None or not form.fullmatch(value):
        raise ModelNotFoundError(f"{hub_endpoint()} gave {repo_id} a malformed {what} "
                                 f"({str(value)[:80]!r}).",
                                 "Check HF_ENDPOINT: it is not a Hugging Face hub or mirror "
                                 "vedit can trust.")
    return value


def _remote_file(sibling: Any, repo_id: str) -> _RemoteFile:
    name = sibling.rfilename
    if "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise ModelNotFoundError(f"{hub_endpoint()} lists a malformed file name in {repo_id} "
                                 f"({name[:80]!r}).", "Check HF_ENDPOINT.")
    content_id = sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id
    if content_id is not None:
        content_id = _checked(content_id, _CONTENT_ID, repo_id, f"content id for {name}")
    return _RemoteFile(name, sibling.size or 0, content_id)


def _blob(storage: Path, content_id: str | None) -> Path:
    """A file's place in the cache, named by its checked content id (none: not known yet)."""
    return storage / "blobs" / (content_id or ".unknown")


def _partial(blob: Path) -> Path:
    """Where a blob's download in progress is kept, as huggingface_hub names it."""
    return blob.with_name(f"{blob.name}.incomplete")


def _partial_size(blob: Path) -> int:
    partial_blob = _partial(blob)
    return partial_blob.stat().st_size if partial_blob.is_file() else 0


def _check_free_space(storage: Path, needed: int) -> None:
    storage.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(storage).free
    if needed > free:
        raise DiskError(f"The download needs {needed / 1e9:.1f} GB but {storage} has "
                        f"{free / 1e9:.1f} GB free.",
                        "Free some space or point HF_HOME to a larger disk, then rerun.")


def _download_file(repo_id: str, remote: _RemoteFile, commit: str, storage: Path,
                   task: Task) -> None:
    """One file into the cache: resume its `<id>.incomplete` blob, check it, link the
    snapshot's entry to it."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import WeakFileLock

    blob = _blob(storage, remote.content_id)
    if not blob.is_file():
        endpoint = hub_endpoint()
        url = hf_hub_url(repo_id, remote.name, revision=commit, endpoint=endpoint)
        meta = get_hf_file_metadata(url, timeout=_metadata_timeout(), endpoint=endpoint)
        content_id = remote.content_id or _checked(meta.etag, _CONTENT_ID, repo_id,
                                                   f"ETag for {remote.name}")
        blob = _blob(storage, content_id)
        blob.parent.mkdir(parents=True, exist_ok=True)
        lock = storage.parent / ".locks" / storage.name / f"{content_id}.vedit.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if not blob.is_file():
                _resume_blob(url, meta, blob, task, _RemoteFile(remote.name, remote.size,
                                                                content_id))
    _link(storage / "snapshots" / commit / remote.name, blob)


def _link(entry: Path, blob: Path) -> None:
    """A snapshot entry pointing at its blob by a relative link, as huggingface_hub's cache has
    them (a copy where the file system has no links)."""
    if entry.is_file():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        entry.unlink(missing_ok=True)  # a dangling link
        os.symlink(os.path.relpath(blob, entry.parent), entry)
    except FileExistsError:
        pass  # another process linked it meanwhile
    except OSError:
        shutil.copyfile(blob, entry)


def _resume_blob(url: str, meta: Any, blob: Path, task: Task, remote: _RemoteFile) -> None:
    """Download into `<blob>.incomplete`, continuing a partial one with a Range request.

    huggingface_hub resumes within one call but deletes partial files when a call fails; a
    multi-GB UNet should survive Ctrl-C, lost connections and stalls, so the partial file is
    ours, and so is the transfer (`_transfer`), which stops when it stalls."""
    from huggingface_hub.utils import build_hf_headers

    partial_blob = _partial(blob)
    resume_size = _partial_size(blob)
    if meta.size is not None and resume_size > meta.size:
        partial_blob.unlink()
        resume_size = 0
    headers = build_hf_headers()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN url: the token stays on the hub
    task.advance(resume_size)
    if meta.size is None or resume_size < meta.size:
        with partial_blob.open("ab") as handle:
            size = _transfer(meta.location, handle, resume_size, headers, task, remote.name)
        if meta.size is not None and size != meta.size:
            raise ModelNotFoundError(f"The download of {remote.name} stopped early ({size} of "
                                     f"{meta.size} bytes).",
                                     "Rerun `vedit fetch-models`: it resumes where it stopped.")
    if not _content_matches(partial_blob, remote.content_id):
        partial_blob.unlink()
        raise ModelNotFoundError(f"The downloaded {remote.name} does not match its checksum.",
                                 "Rerun `vedit fetch-models` to download it again.")
    os.replace(partial_blob, blob)


def _transfer(url: str, handle: Any, held: int, headers: dict[str, str], task: Task,
              name: str) -> int:
    """GET `url` onto the end of `handle`, which holds `held` bytes of it already; returns the
    bytes it holds then. A dropped connection is resumed with a Range request (RESUMES times);
    a transfer that brings fewer than STALL_BYTES within the download timeout is stopped."""
    from huggingface_hub.errors import HfHubHTTPError, HTTPError
    from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

    timeout = _download_timeout()
    retry = ("Rerun `vedit fetch-models` later: it resumes where it stopped. On a slow link, "
             "raise HF_HUB_DOWNLOAD_TIMEOUT (seconds).")
    for attempt in range(RESUMES + 1):
        ranged = headers | ({"Range": f"bytes={held}-"} if held else {})
        try:
            with http_stream_backoff("GET", url, headers=ranged, timeout=timeout,
                                     retry_on_exceptions=(),
                                     retry_on_status_codes=(408, 429)) as response:
                hf_raise_for_status(response)
                if held and response.status_code == 200:  # the server ignored the range
                    handle.seek(0)
                    handle.truncate()
                    task.advance(-held)
                    held = 0
                since, recent = time.monotonic(), 0
                for chunk in response.iter_bytes():
                    handle.write(chunk)
                    held, recent = held + len(chunk), recent + len(chunk)
                    task.advance(len(chunk))
                    if time.monotonic() - since >= timeout:
                        if recent < STALL_BYTES:
                            raise ModelNotFoundError(
                                f"The download of {name} stalled ({recent} bytes in the last "
                                f"{timeout:g} s).", retry)
                        since, recent = time.monotonic(), 0
            return held
        except HfHubHTTPError:
            raise
        except HTTPError as error:  # the connection dropped, or nothing came within the timeout
            if attempt == RESUMES:
                raise ModelNotFoundError(f"The download of {name} kept failing "
                                         f"({type(error).__name__}).", retry) from None
            time.sleep(1)
    return held


def _content_matches(path: Path, content_id: str | None) -> bool:
    """Check a file against the hub's id for it: sha256 for LFS files, git blob sha1 otherwise."""
    if content_id is None:
        return True  # a listing without ids (some mirrors): the size was checked
    if len(content_id) == 64:
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == content_id


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """Point refs/<revision> at `commit` (atomically), as huggingface_hub's cache layout expects."""
    if revision == commit:
        return
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit, encoding="utf-8")
    os.replace(tmp, ref)


# --- listing --------------------------------------------------------------------------------


def list_models() -> list[CachedModel]:
    """The models on disk: complete pipeline snapshots and CLIP scoring models in the HF cache,
    with their size, and converted single-file checkpoints."""
    return sorted(_cached_hub_models() + converted_models(), key=lambda m: (m.name, m.path))


def _cached_hub_models() -> list[CachedModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(hub_cache_dir())
    except CacheNotFound:
        return []
    found = []
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            role = _snapshot_role(revision.snapshot_path)
            if role is not None:
                found.append(CachedModel(repo.repo_id, "hub", revision.snapshot_path,
                                         revision.size_on_disk, revision.commit_hash,
                                         tuple(sorted(revision.refs)), role))
    return found


def _snapshot_role(folder: Path) -> Literal["base", "scoring"] | None:
    """"base" for a complete pipeline, "scoring" for a CLIP with weights, else None."""
    if _is_pipeline_snapshot(folder):
        return "base"
    if is_clip_folder(folder) and any(WEIGHT_NAME.match(p.name) for p in folder.iterdir()):
        return "scoring"
    return None


def _is_pipeline_snapshot(folder: Path) -> bool:
    unet = folder / "unet"
    return (folder / "model_index.json").is_file() and unet.is_dir() and any(
        WEIGHT_NAME.match(p.name) for p in unet.iterdir())
