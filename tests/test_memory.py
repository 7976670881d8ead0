"""The memory prediction: the tracer counts exactly, CUDA's autocast and attention kernels are
applied, the caching allocator is modelled, and `--dry-run` predicts without writing."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from typer.testing import CliRunner

from vedit import tune as tune_stage
from vedit.cli import app
from vedit.errors import BadInputError, OutOfMemoryError
from vedit.extract import extract
from vedit.memory import predict as predict_module
from vedit.memory.accelerator import prime_optimizer
from vedit.memory.allocator import MIB, CachingAllocator, replay
from vedit.memory.autocast import AutocastState
from vedit.memory.gpu import (
    CONTEXT_BYTES,
    Gpu,
    attention_backend,
    attention_backward_scratch,
)
from vedit.memory.predict import (
    Advice,
    MemoryPrediction,
    TunePlan,
    _largest,
    predict,
)
from vedit.memory.trace import Trace, simulated_gpu
from vedit.models import resolve_model
from vedit.settings import ExtractSettings, TuneSettings
from vedit.synthetic import make_clip

runner = CliRunner()
H100 = Gpu("H100", 80 * 2**30, (9, 0))
AMPERE = Gpu("RTX", 24 * 2**30, (8, 6))


def test_the_trace_counts_a_known_step_exactly() -> None:
    """One training step of a bias-free linear layer, by hand: weights, AdamW's two moments
    and step, the input; then the weight's gradient, the loss and backward's seed; and the
    cuBLAS workspaces of the forward and the backward handles."""
    batch, inputs, outputs = 8, 64, 32
    with simulated_gpu(AMPERE) as sim:
        with sim.untraced():
            layer = torch.nn.Linear(inputs, outputs, bias=False)
            optimizer = torch.optim.AdamW(layer.parameters(), fused=True)
            prime_optimizer(optimizer)
            x = torch.randn(batch, inputs)
        layer(x).sum().backward()
        optimizer.step()
    weight = 4 * outputs * inputs
    held = 3 * weight + 4 * batch * inputs + 4  # weights, moments, input, step
    workspaces = 2 * AMPERE.cublas_workspace_bytes
    live, peak = {}, 0
    for kind, key, nbytes in sim.trace.events:
        if kind == "alloc":
            live[key] = nbytes
        else:
            live.pop(key, None)
        peak = max(peak, sum(live.values()))
    assert peak == held + weight + 4 + 4 + workspaces  # + gradient, loss, seed
    # Through the allocator: every small tensor takes a 512-byte block, each workspace its own.
    small = 4 * weight + 4 * batch * inputs + 3 * 512
    assert sim.trace.replay().peak_allocated == small + workspaces


def test_cuda_autocast_dtypes_and_its_cache_apply_in_checkpoint_replays() -> None:
    seen: list[tuple[str, torch.dtype]] = []
    with simulated_gpu(AMPERE) as sim:
        linear = torch.nn.Linear(16, 16)
        norm = torch.nn.GroupNorm(4, 16)

        def block(x: torch.Tensor) -> torch.Tensor:
            hidden = linear(x)
            seen.append(("linear", hidden.dtype))
            normed = norm(hidden[:, :, None])
            seen.append(("group_norm", normed.dtype))
            return normed * normed  # saves `normed`: the replay goes past the norm

        x = torch.randn(2, 16, requires_grad=True)
        with sim.functions.region(AutocastState(True, torch.float16)):
            out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            assert torch.softmax(out, 1).dtype == torch.float32
            cast = sim.functions.autocast.cast
            assert cast(linear.weight, torch.float16) is cast(linear.weight, torch.float16)
        out.sum().backward()  # the replay, outside the region, casts as the forward did
    assert seen == [("linear", torch.float16), ("group_norm", torch.float32)] * 2


def test_attention_runs_the_kernel_the_gpu_would_with_its_backward_scratch() -> None:
    def query(head_dim: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return torch.empty(2, 8, 64, head_dim, dtype=dtype, device="meta")

    assert attention_backend(H100, query(40), query(40), None, True) == "cudnn"
    assert attention_backend(H100, query(160), query(160), None, True) == "flash"
    assert attention_backend(H100, query(512), query(512), None, False) == "efficient"
    assert attention_backend(AMPERE, query(40), query(40), None, True) == "flash"
    assert attention_backend(AMPERE, query(40, torch.float32), query(40), None, True) == \
        "efficient"
    # Flash attention's backward pads the 8-frame sequence to 128 and the head dim to 64.
    assert attention_backward_scratch("flash", query(40)[:, :, :8]) == 4 * 2 * 8 * 128 * 65
    with simulated_gpu(AMPERE) as sim:
        q = torch.randn(2, 8, 8, 40, dtype=torch.float16, requires_grad=True)
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    sizes = [n for kind, _, n in sim.trace.events if kind == "alloc"]
    assert 4 * 2 * 8 * 128 * 65 in sizes  # the scratch, as modelled
    assert 2 * 8 * 8 * 8 * 2 not in sizes  # no attention matrix: not the math path


def test_the_caching_allocator_rounds_splits_and_releases_as_pytorch_does() -> None:
    allocator = CachingAllocator()
    allocator.malloc(0, 100)  # a 2 MiB small-pool segment, a 512-byte block of it
    allocator.malloc(1, 3 * MIB)  # a 20 MiB segment, split
    assert (allocator.allocated, allocator.reserved) == (512 + 3 * MIB, 22 * MIB)
    allocator.free(1)
    allocator.malloc(2, 19 * MIB + 512)  # the 20 MiB block, unsplit: counted whole
    assert allocator.allocated == 512 + 20 * MIB and allocator.reserved == 22 * MIB
    events = [("alloc", 0, 12 * MIB), ("free", 0, 0), ("alloc", 1, 14 * MIB)]
    assert replay(events).peak_reserved == 26 * MIB  # the cached 12 MiB segment is kept...
    assert replay(events, capacity=16 * MIB).fits  # ...until memory runs short
    assert not replay([*events, ("alloc", 2, 4 * MIB)], capacity=16 * MIB).fits


def _peak(peak_bytes: int, fits: bool) -> MemoryPrediction:
    return MemoryPrediction(peak_bytes, peak_bytes, "a step", AMPERE, fits)


def test_the_search_for_settings_that_fit() -> None:
    usable = AMPERE.usable_bytes
    asked: list[int] = []

    def linear(frames: int) -> MemoryPrediction:  # 1 GiB a frame over 2 GiB
        asked.append(frames)
        peak = (2 + frames) * 2**30
        return _peak(peak, peak <= usable)

    found = _largest(linear, 64, linear(64), AMPERE)
    assert found is not None and found[0] == int((usable / 2**30) - 2)
    assert len(asked) <= 4  # the asked point, half of it, one estimate
    assert _largest(lambda f: _peak(10**15, False), 64, _peak(10**15, False), AMPERE) is None


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("memory") / "clip.mp4", width=96, height=64,
                     fps=10, seconds=1.0, audio=False)


def test_a_prediction_fits_or_not_by_replaying_the_trace_on_the_device() -> None:
    trace = Trace()
    with trace.section("the training step"):
        held = [trace.alloc(300 * MIB) for _ in range(3)]
    for key in held:
        trace.free(key)
    roomy = predict(trace, Gpu("roomy", 80 * 2**30))
    assert roomy.fits and roomy.peak_during == "the training step"
    assert roomy.peak_bytes == roomy.reserved_bytes == 900 * MIB
    tight = predict(trace, Gpu("tight", CONTEXT_BYTES + 600 * MIB))
    assert tight.fits is False and tight.peak_bytes == roomy.peak_bytes
    unknown = predict(trace, Gpu("unknown", None))
    assert unknown.fits is None and unknown.to_dict()["device_memory_gb"] is None
    assert "give --gpu-memory" in unknown.summary()
    advice = dataclasses.replace(tight, advice=(Advice("--frames 2", 2**30),))
    assert "does not fit tight" in advice.summary()
    assert advice.to_dict()["advice"] == [{"change": "--frames 2", "predicted_peak_gb": 1.0}]


@pytest.fixture(scope="module")
def tuned(tiny_model: Path, clip: Path) -> tuple[Path, dict[str, Any]]:
    """A project of the clip's frames tuned one step by `vedit tune --json`, as if on a GPU that
    measured a peak of 0.5 GB (the result then puts the model's prediction next to it)."""
    project = clip.parent / "project"
    extract(clip, project, ExtractSettings(frames=2, size="64"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tune_stage, "measured_peak_gb", lambda device: 0.5)
        result = runner.invoke(app, ["tune", str(project), "--prompt", "a cat", "--model",
                                     str(tiny_model), "--steps", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    return project, json.loads(result.stdout)


@pytest.mark.slow  # tunes and traces the tiny model
def test_a_run_on_a_gpu_reports_its_peak_next_to_the_prediction(
        tuned: tuple[Path, dict[str, Any]]) -> None:
    memory = tuned[1]["memory"]
    assert memory["measured_peak_gb"] == 0.5 and memory["predicted_peak_gb"] > 0
    assert memory["error_percent"] == round(100 * (memory["predicted_peak_gb"] - 0.5) / 0.5, 1)


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow  # traces the tiny model twice: seconds of fake-tensor ops
def test_dry_run_predicts_without_writing(tiny_model: Path, clip: Path,
                                          tuned: tuple[Path, dict[str, Any]]) -> None:
    before = _files(clip.parent)
    result = runner.invoke(app, ["tune", str(clip), "--model", str(tiny_model), "--frames", "4",
                                 "--project", str(clip.parent / "new"), "--dry-run",
                                 "--gpu-memory", "24", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["frames"], report["width"], report["height"]) == (4, 96, 64)
    memory = report["memory"]
    assert memory["fits"] is True and memory["device_memory_gb"] == 24.0
    assert 0 < memory["predicted_peak_gb"] <= memory["predicted_reserved_gb"]
    assert memory["peak_during"] == "the training step" and memory["advice"] == []

    result = runner.invoke(app, ["edit", str(tuned[0]), "--dry-run", "--gpu-memory", "24"])
    assert result.exit_code == 0, result.stderr
    assert "fits a 24 GB GPU" in result.stdout and "nothing was run or written" in result.stdout
    assert _files(clip.parent) == before  # no project made, nothing added to the tuned one


def test_out_of_memory_says_the_predicted_peak_and_what_fits(
        tiny_model: Path, tuned: tuple[Path, dict[str, Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    planned: list[TunePlan] = []

    def prediction(plan: TunePlan, gpu: Gpu) -> MemoryPrediction:  # traced in other tests
        planned.append(plan)
        return dataclasses.replace(_peak(30 * 2**30, False),
                                   advice=(Advice("--frames 12 (at 64x64)", 20 * 2**30),))

    monkeypatch.setattr(tune_stage, "_loop", no_memory)
    monkeypatch.setattr(predict_module, "predict_tune", prediction)
    with pytest.raises(OutOfMemoryError) as caught:
        tune_stage.tune(tuned[0], TuneSettings(prompt="a cat", model=str(tiny_model), steps=1))
    assert caught.value.hint == (f"The predicted peak is 30.0 GB on {AMPERE.describe()}. "
                                 "These fit: --frames 12 (at 64x64) (20.0 GB).")
    [plan] = planned  # the run that ran out: the project's frames, latents cached
    assert (plan.frames, plan.width, plan.height, plan.encodes_frames) == (2, 96, 64, False)

    monkeypatch.setattr(predict_module, "predict_tune", lambda plan, gpu: 1 / 0)
    with pytest.raises(OutOfMemoryError) as caught:
        tune_stage.tune(tuned[0], TuneSettings(prompt="a cat", model=str(tiny_model), steps=1))
    assert "fewer frames" in caught.value.hint  # a failed prediction leaves the plain hint


@pytest.fixture(scope="module")
def sd15_configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 1.5's configs and a tokenizer, no weights: what `fetch-models --configs-only` leaves."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import shapes

    return shapes.write_configs(shapes.SD15, tmp_path_factory.mktemp("sd15") / "sd15")


def test_benchmark_shapes_make_a_config_only_folder(sd15_configs: Path) -> None:
    source = resolve_model(sd15_configs, configs_only=True)
    assert not list(sd15_configs.rglob("*.safetensors"))
    assert source.components["unet"].weight_files == ()
    with pytest.raises(BadInputError, match=r"no \.safetensors weights"):
        resolve_model(sd15_configs)


@pytest.mark.slow  # traces SD 1.5's tuning step at 24 frames: well under a minute
def test_a_24_frame_sd15_dry_run_from_configs_alone(sd15_configs: Path, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "long.mp4", width=96, height=64, fps=10, seconds=3.0,
                     audio=False)
    result = runner.invoke(app, ["tune", str(clip), "--model", str(sd15_configs), "--frames",
                                 "24", "--stride", "1", "--crop", "--dry-run", "--gpu-memory",
                                 "24", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["frames"], report["width"], report["height"]) == (24, 512, 512)
    memory = report["memory"]
    # 860 M frozen UNet weights in bf16 alone are 1.6 GB; the whole run fits a 24 GB card.
    assert 1.6 < memory["predicted_peak_gb"] < 24 and memory["fits"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]  # no project made


def test_gpu_memory_goes_with_a_dry_run(clip: Path) -> None:
    result = runner.invoke(app, ["tune", str(clip), "--prompt", "a cat", "--gpu-memory", "24"])
    assert result.exit_code == 2 and "--gpu-memory goes with --dry-run" in result.stderr
    result = runner.invoke(app, ["edit", str(clip.parent), "--dry-run", "--gpu-memory", "-1"])
    assert result.exit_code == 2 and "not a size in GB" in result.stderr
    assert not (clip.parent / "clip.vedit").exists()  # nothing extracted
