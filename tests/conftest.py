"""Fixtures for the base model: tiny SD models built in code, and a hub that is never the real
one (a fake one, served locally, for the tests that download)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import CHUNK, FakeHub, closed_port_endpoint, point_hub_at

from vedit.tiny_model import build_tiny_clip, build_tiny_model

_SCRATCH = Path(tempfile.mkdtemp(prefix="vedit-tests-"))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject's default): one worker a core, at most four. Most tests run tiny
    models in one thread, so two workers on CI's two cores halve the suite's time; past four,
    each worker's own copy of the session fixtures costs more than it gains."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module imports huggingface_hub (it reads its settings once, at import),
    point it at a closed local port and throwaway caches: no test, nor a `vedit` it starts,
    reaches huggingface.co or touches the user's caches. Under xdist, each worker (and each
    process a test starts) gets its share of the cores for torch's threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        import torch  # already imported by the `projects` plugin: too late for the variables

        torch.set_num_threads(int(threads))
    os.environ.update({
        "HF_ENDPOINT": closed_port_endpoint(),
        "HF_HOME": str(_SCRATCH / "hf-home"),
        "HF_HUB_CACHE": str(_SCRATCH / "hf-home" / "hub"),
        "VEDIT_CACHE_DIR": str(_SCRATCH / "vedit-cache"),
        "VEDIT_CONFIG": str(_SCRATCH / "empty-user-config.toml"),  # not the developer's own
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
    })
    (_SCRATCH / "empty-user-config.toml").write_text("")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.pop(name, None)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _isolated_hub() -> Iterator[None]:
    """The same, for a huggingface_hub imported before pytest_configure (by a plugin)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        point_hub_at(monkeypatch, os.environ["HF_ENDPOINT"], Path(os.environ["HF_HOME"]))
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 1.x model (epsilon, PNDM scheduler) in diffusers layout; 64 px native."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd1")


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 2.x-style model (v_prediction, DDIM, linear projections)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd2",
                            prediction_type="v_prediction", sd2=True)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP in the layout of openai/clip-vit-large-patch14 (32 px images)."""
    return build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running fake hub that huggingface_hub and vedit point at, with an empty HF cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    with FakeHub() as hub:
        point_hub_at(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        yield hub


@pytest.fixture(scope="session")
def tiny_model_xl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model in SDXL's layout (two text encoders, "text_time" UNet, Euler)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", sdxl=True)
