"""Fetching from a fake hub (selection, variants, resume, offline and unreachable) and listing
what is cached."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hub_server import CHUNK, FakeHub, go_offline
from pipeline_files import NEEDED, UNET_FILE, snapshot_files
from safetensors.torch import load_file, save

from vedit.errors import BadInputError, ModelNotFoundError
from vedit.hub import fetch_model, list_models
from vedit.models import load_components
from vedit.progress import Reporter

REPO = "tiny-org/tiny-sd"
CUT = 16 * CHUNK
# What a real SD repo also holds, and vedit must never download.
NOT_NEEDED = {
    "unet/diffusion_pytorch_model.bin": b"pickle, never loaded",
    "v1-4.ckpt": b"pickle, never loaded",
    "text_encoder/flax_model.msgpack": b"flax",
    "safety_checker/config.json": b"{}",
    "safety_checker/model.safetensors": b"not needed",
    "feature_extractor/preprocessor_config.json": b"{}",
    "README.md": b"# tiny",
}


@dataclass
class RecordedTask:
    description: str
    total: float | None
    completed: float = 0

    def advance(self, amount: float = 1.0) -> None:
        self.completed += amount

    def update(self, *, completed: float | None = None, total: float | None = None,
               description: str | None = None, status: str | None = None) -> None:
        self.completed = self.completed if completed is None else completed
        self.total = self.total if total is None else total


class RecordingReporter(Reporter):
    """A Reporter that keeps its progress tasks, to check what a stage reported."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[RecordedTask] = []

    @contextmanager
    def task(self, description: str, total: float | None = None, *,
             in_bytes: bool = False) -> Iterator[RecordedTask]:
        self.tasks.append(RecordedTask(description, total))
        yield self.tasks[-1]


def _download_task(reporter: RecordingReporter) -> RecordedTask:
    [task] = [t for t in reporter.tasks if t.description.startswith("Downloading")]
    return task


def _fp16_bytes(path: Path) -> bytes:
    return save({k: v.half() for k, v in load_file(path).items()})


# --- fetching from the hub -----------------------------------------------------------------


def test_fake_hub_serves_huggingface_hubs_own_downloads(tiny_model: Path,
                                                        fake_hub: FakeHub) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    sha = fake_hub.add_folder(REPO, tiny_model)
    folder = Path(snapshot_download(REPO, allow_patterns=["*.json", "unet/*"]))
    assert folder.name == sha and (folder / UNET_FILE).read_bytes() == \
        (tiny_model / UNET_FILE).read_bytes()
    assert Path(hf_hub_download(REPO, "tokenizer/merges.txt")).read_bytes() == \
        (tiny_model / "tokenizer/merges.txt").read_bytes()
    assert not fake_hub.unexpected()


def test_fetch_downloads_only_the_pipeline_safetensors(tiny_model: Path, fake_hub: FakeHub) -> None:
    sha = fake_hub.add_folder(REPO, tiny_model, extra={
        **NOT_NEEDED, "unet/diffusion_pytorch_model.fp16.safetensors": b"fp16, not asked"})

    snapshot = fetch_model(REPO)

    assert snapshot.name == sha
    assert snapshot_files(snapshot) == NEEDED
    fetched = {r.path.split(f"/resolve/{sha}/")[-1] for r in fake_hub.requests
               if r.method == "GET" and "/resolve/" in r.path}
    assert not fetched & set(NOT_NEEDED)
    assert not fake_hub.unexpected()
    assert not any("xet" in r.path for r in fake_hub.requests)
    assert (snapshot / UNET_FILE).read_bytes() == (tiny_model / UNET_FILE).read_bytes()

    parts = load_components(REPO, device="cpu")  # from the cache, with no request
    count = len(fake_hub.requests)
    assert parts.commit_hash == sha and parts.fingerprint == f"hf:{REPO}@{sha}"
    assert len(fake_hub.requests) == count

    [listed] = [m for m in list_models() if m.name == REPO]
    assert listed.kind == "hub" and listed.commit_hash == sha and listed.refs == ("main",)
    assert listed.size_bytes >= sum((tiny_model / f).stat().st_size for f in NEEDED)


def test_fetch_picks_fp16_variant_where_present(tiny_model: Path, fake_hub: FakeHub) -> None:
    fake_hub.add_folder(REPO, tiny_model, extra={
        "unet/diffusion_pytorch_model.fp16.safetensors": _fp16_bytes(tiny_model / UNET_FILE),
        "text_encoder/model.fp16.safetensors":
            _fp16_bytes(tiny_model / "text_encoder/model.safetensors"),
    })

    snapshot = fetch_model(REPO, variant="fp16")

    files = snapshot_files(snapshot)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files and UNET_FILE not in files
    assert "text_encoder/model.fp16.safetensors" in files
    assert "vae/diffusion_pytorch_model.safetensors" in files  # no fp16 vae: plain one instead
    parts = load_components(REPO, device="cpu", variant="fp16")
    assert parts.source.components["unet"].dtype == "float16"
    assert parts.unet.dtype == torch.float32  # cast for the CPU
    assert parts.fingerprint.endswith("+fp16")


def test_fetch_resumes_a_transfer_cut_within_the_call(tiny_model: Path, fake_hub: FakeHub) -> None:
    fake_hub.add_folder(REPO, tiny_model)
    size = (tiny_model / UNET_FILE).stat().st_size
    fake_hub.cut_off(UNET_FILE, after_bytes=CUT)
    reporter = RecordingReporter()

    snapshot = fetch_model(REPO, reporter=reporter)

    first, second = fake_hub.downloads(UNET_FILE)
    assert (first.range_start, first.bytes_sent) == (None, CUT)
    assert (second.range_start, second.bytes_sent) == (CUT, size - CUT)
    assert (snapshot / UNET_FILE).read_bytes() == (tiny_model / UNET_FILE).read_bytes()
    task = _download_task(reporter)  # progress counts each byte once
    assert task.completed == task.total == sum((tiny_model / f).stat().st_size for f in NEEDED)


def test_fetch_resumes_a_partial_file_on_the_next_call(tiny_model: Path, fake_hub: FakeHub,
                                                       tmp_path: Path) -> None:
    fake_hub.add_folder(REPO, tiny_model)
    content = (tiny_model / UNET_FILE).read_bytes()
    fake_hub.cut_off(UNET_FILE, after_bytes=CUT, then_fail=1)

    with pytest.raises(ModelNotFoundError) as failure:
        fetch_model(REPO)
    assert "fetch-models" in failure.value.hint
    [partial] = (tmp_path / "hf-home" / "hub").glob("models--*/blobs/*.incomplete")
    assert partial.stat().st_size == CUT
    with pytest.raises(ModelNotFoundError, match=r"incomplete|not in the"):
        load_components(REPO, device="cpu")  # refs/main is written only once all files are in

    reporter = RecordingReporter()
    snapshot = fetch_model(REPO, reporter=reporter)

    task = _download_task(reporter)
    assert task.completed == task.total == sum((tiny_model / f).stat().st_size for f in NEEDED)
    last = fake_hub.downloads(UNET_FILE)[-1]
    assert (last.range_start, last.bytes_sent) == (CUT, len(content) - CUT)
    assert hashlib.sha256((snapshot / UNET_FILE).read_bytes()).digest() == \
        hashlib.sha256(content).digest()
    assert not list((tmp_path / "hf-home" / "hub").glob("models--*/blobs/*.incomplete"))


def test_unknown_repo_and_pickle_only_repo(tiny_model: Path, fake_hub: FakeHub) -> None:
    with pytest.raises(ModelNotFoundError, match="no model nobody/nothing"):
        fetch_model("nobody/nothing")
    files = {p.relative_to(tiny_model).as_posix(): p.read_bytes()
             for p in tiny_model.rglob("*") if p.is_file()}
    del files[UNET_FILE]
    fake_hub.add_repo(REPO, {**files, "unet/diffusion_pytorch_model.bin": b"pickle"})
    with pytest.raises(BadInputError, match=r"unet/ has no \.safetensors"):
        fetch_model(REPO)


def test_a_corrupt_partial_file_is_caught_and_fetched_again(tiny_model: Path, fake_hub: FakeHub,
                                                             tmp_path: Path) -> None:
    fake_hub.add_folder(REPO, tiny_model)
    content = (tiny_model / UNET_FILE).read_bytes()
    blobs = tmp_path / "hf-home" / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True)
    partial = blobs / f"{hashlib.sha256(content).hexdigest()}.incomplete"
    partial.write_bytes(b"x" * CUT)  # e.g. a disk error while the earlier run wrote it

    with pytest.raises(ModelNotFoundError, match="checksum"):
        fetch_model(REPO)
    assert not partial.exists()
    snapshot = fetch_model(REPO)
    assert (snapshot / UNET_FILE).read_bytes() == content


def test_an_sdxl_repo_is_fetched_with_its_second_encoder(tiny_model_xl: Path,
                                                         fake_hub: FakeHub) -> None:
    sha = fake_hub.add_folder("stabilityai/tiny-sdxl", tiny_model_xl, extra=NOT_NEEDED)
    snapshot = fetch_model("stabilityai/tiny-sdxl")
    sdxl_needed = {f.replace("text_encoder/", "text_encoder_2/").replace("tokenizer/",
                                                                         "tokenizer_2/")
                   for f in NEEDED if f.startswith(("text_encoder/", "tokenizer/"))}
    assert snapshot.name == sha and snapshot_files(snapshot) == NEEDED | sdxl_needed
    assert not fake_hub.unexpected()
    parts = load_components("stabilityai/tiny-sdxl", device="cpu")
    assert parts.source.family == "sdxl" and parts.text_encoder_2 is not None


def test_a_pipeline_that_is_neither_sd_nor_sdxl_is_refused_before_its_weights(
        tiny_model: Path, fake_hub: FakeHub) -> None:
    config = json.loads((tiny_model / "unet/config.json").read_text())
    config["addition_embed_type"] = "image"
    fake_hub.add_folder(REPO, tiny_model, extra={"unet/config.json": json.dumps(config).encode()})
    with pytest.raises(BadInputError, match="'image' added conditioning"):
        fetch_model(REPO)
    assert not [r for r in fake_hub.requests if r.path.endswith(".safetensors")
                and r.method == "GET"]


def test_offline_missing_model_fails_fast_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    go_offline(monkeypatch)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as fetching:
        fetch_model("some-org/not-cached")
    with pytest.raises(ModelNotFoundError) as loading:
        load_components("some-org/not-cached", device="cpu")
    assert time.monotonic() - start < 5
    assert "HF_HUB_OFFLINE" in fetching.value.message
    assert "vedit fetch-models some-org/not-cached" in fetching.value.hint
    assert "vedit fetch-models some-org/not-cached" in loading.value.hint


def test_offline_fetch_of_a_cached_model_needs_no_network(tiny_model: Path, fake_hub: FakeHub,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add_folder(REPO, tiny_model)
    snapshot = fetch_model(REPO)
    count = len(fake_hub.requests)
    go_offline(monkeypatch)
    assert fetch_model(REPO) == snapshot
    assert len(fake_hub.requests) == count


def test_unreachable_hub_fails_fast() -> None:
    # The session fixture points the hub at a closed local port.
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="Could not reach") as failure:
        fetch_model("some-org/some-model")
    assert time.monotonic() - start < 5
    assert "HF_HUB_OFFLINE" in failure.value.hint


def test_configs_only_fetches_no_weights_and_the_weights_come_later(
        tiny_model: Path, fake_hub: FakeHub) -> None:
    """`fetch-models --configs-only`: the configs and tokenizer (enough for `--dry-run`), no
    weights; the model is not loadable until a plain fetch brings them."""
    from vedit.models import resolve_model

    fake_hub.add_folder(REPO, tiny_model)
    snapshot = fetch_model(REPO, configs_only=True)
    configs = {f for f in NEEDED if not f.endswith(".safetensors")}
    assert snapshot_files(snapshot) == configs
    assert not [r for r in fake_hub.requests if r.path.endswith(".safetensors")]
    assert resolve_model(REPO, configs_only=True).path == snapshot
    with pytest.raises(ModelNotFoundError, match="incomplete"):
        resolve_model(REPO)
    assert snapshot_files(fetch_model(REPO)) == NEEDED
    load_components(REPO, device="cpu")
