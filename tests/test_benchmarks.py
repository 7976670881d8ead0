"""The benchmarks' CPU form runs and writes its table; vedit's speed levers keep results equal.

The benchmarks themselves time nothing here (no test may depend on timing): these tests check
that the tiny CPU form produces finite rows for both recipes, and that each lever vedit pulls
by default for speed (gradient checkpointing, fused AdamW, cached latents, bf16 frozen
weights, LoRA instead of full query updates) gives the same results as the plain path, within
tolerance, on the tiny shapes in fp32.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from einops import rearrange

from vedit.latents import FrameLatents, encode_frames

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str) -> ModuleType:
    """Import a script of benchmarks/ (they import each other by plain name, as scripts)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


run = _benchmark("run")
recipes = _benchmark("recipes")
shapes = _benchmark("shapes")
memory_model = _benchmark("memory_model")

CPU = torch.device("cpu")
BENCH = recipes.Bench(shapes.TINY, CPU, 64, 64)
FRAMES = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny shapes gain nothing from more threads, and lose much on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_cpu_form_writes_rows_for_both_recipes(tmp_path: Path) -> None:
    argv = ["--tiny", "--frames", "2", "--edit-frames", "2", "--edit-steps", "2", "--steps",
            "2", "--warmup", "1", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {row["row"]: row for row in data["table"] if row["frames"] == 2}
    for label in ("tune step (s)", "tune achieved TFLOP/s", "same step, plain 2D UNet (s)",
                  "inflated / 2D step time", "edit end to end (s)",
                  "edit with a cached inversion (s)", "edit sampling step with guidance (s)"):
        row = rows[label]
        for value in (row["original"], row["vedit"], row["ratio"]):
            assert value is not None and math.isfinite(value) and value > 0, (label, row)
    assert not [label for label in rows if "memory" in label]  # no GPU, no memory rows
    assert data["meta"]["command"] == "python benchmarks/run.py " + " ".join(argv)
    table = (tmp_path / "results.md").read_text()
    assert "| tune step (s) | 2 |" in table and "torch " in table


def test_a_spent_budget_skips_every_row_and_still_writes(tmp_path: Path) -> None:
    assert run.main(["--tiny", "--frames", "2", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"] and all(r["note"] == "not run: time budget" and not r["metrics"]
                                   for r in data["results"])
    assert "not run: time budget" in (tmp_path / "results.md").read_text()


def _fake_tuning(task: object, bench: object, args: object) -> dict[str, float]:
    """A GPU's answers without a GPU: 4 frames and more run out of memory; 3 is a bug."""
    if task.frames == 3:
        raise ValueError("a bug\nwith details")
    if task.frames >= 4:
        raise torch.OutOfMemoryError("CUDA out of memory.")
    return {"step_s": 0.1, "peak_gb": 1.0}


def test_out_of_memory_is_noted_and_longer_clips_are_not_tried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "measure_tuning", _fake_tuning)
    argv = ["--tiny", "--rows", "tune", "--frames", "2,4,8,3", "--keep-going", "--out",
            str(tmp_path)]
    assert run.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    notes = {(r["recipe"], r["frames"]): r["note"] for r in data["results"]}
    assert notes[("vedit", 2)] == "" and notes[("original", 4)] == "OOM"
    assert notes[("vedit", 8)] == "not run: OOM at 4 frames"
    assert notes[("vedit", 3)] == "error: ValueError: a bug"
    assert "| tune step (s) | 4 | OOM | OOM |" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError):  # without --keep-going, a bug stops the run
        run.main(["--tiny", "--rows", "tune", "--frames", "3", "--out", str(tmp_path)])


def test_rows_run_frame_count_by_frame_count_in_the_order_given() -> None:
    args = run.parse_args(["--frames", "8,24,64", "--edit-frames", "8,24", "--rows",
                           "tune,edit", "--recipes", "original,vedit"])
    order = [(t.frames, t.kind, t.recipe) for t in run.plan(args)]
    assert order[:4] == [(8, "tune", "original"), (8, "tune", "vedit"),
                         (8, "edit", "original"), (8, "edit", "vedit")]
    assert [f for f, *_ in order] == [8] * 4 + [24] * 4 + [64] * 2


def test_bf16_peaks_are_looked_up_by_device_name() -> None:
    assert run.bf16_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert run.bf16_peak("NVIDIA H100 PCIe") == 756.0
    assert run.bf16_peak("NVIDIA L40S") == 362.0
    assert run.bf16_peak("Some Future GPU") is None


def _fp32_tuning(recipe: str, **levers: object) -> object:
    return recipes.build_tuning(recipe, FRAMES, BENCH, mixed_precision="no", **levers)


def _gradients(tuning: object) -> dict[str, torch.Tensor]:
    tuning.loss().backward()
    return {n: p.grad.clone() for n, p in tuning.unet.unet.named_parameters()
            if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    plain = _gradients(_fp32_tuning("vedit", checkpointing=False))
    checkpointed = _gradients(_fp32_tuning("vedit", checkpointing=True))
    assert plain.keys() == checkpointed.keys() and any(".attn_temp." in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_adamw_makes_the_same_updates_as_plain_adamw() -> None:
    fused, plain = (_fp32_tuning("vedit", fused=flag) for flag in (True, False))
    before = [p.detach().clone() for p in plain.clipped]
    for tuning in (fused, plain):
        for _ in range(3):
            tuning.step()
    for mine, theirs in zip(fused.clipped, plain.clipped, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(p, q) for p, q in zip(plain.clipped, before, strict=True))


def test_cached_latents_sample_what_encoding_every_step_samples() -> None:
    vae = shapes.build_vae(shapes.TINY, CPU, torch.float32)
    pixels = torch.rand((FRAMES, 3, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1
    scale = vae.config.scaling_factor
    mean, std = encode_frames(vae, pixels, slice_size=2)  # cached in slices, as latents.py does
    cached = FrameLatents(*(rearrange(t, "f c h w -> 1 c f h w") for t in (mean, std)),
                          "unused", Path("latents"), reused=True)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist  # what the original draws from every step
    noise = torch.randn(cached.mean.shape, generator=torch.Generator().manual_seed(5))
    per_step = (posterior.mean + posterior.std * rearrange(noise, "1 c f h w -> f c h w")) * scale
    torch.testing.assert_close(cached.sample(torch.Generator().manual_seed(5)),
                               rearrange(per_step, "f c h w -> 1 c f h w"),
                               rtol=1e-4, atol=1e-5)


def _prediction(tuning: object) -> torch.Tensor:
    sample = torch.randn(BENCH.latent_shape(FRAMES), generator=torch.Generator().manual_seed(3))
    embeds = recipes.prompt_embeds(BENCH, tuning.unet.dtype)
    return tuning.unet(sample.to(tuning.unet.dtype), torch.tensor([500]), embeds).float()


def test_bf16_frozen_weights_predict_within_tolerance_of_fp32() -> None:
    exact = _prediction(_fp32_tuning("vedit"))
    fast = recipes.build_tuning("vedit", FRAMES, BENCH, mixed_precision="bf16")
    assert fast.unet.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in fast.clipped)  # trained weights stay fp32
    approximate = _prediction(fast)
    assert (approximate - exact).norm() / exact.norm() < 0.03


def test_both_recipes_start_as_the_same_model() -> None:
    """LoRA's B starts at zero, so vedit's model is the original's until it trains: the same
    prediction and the same gradients for the temporal attention both train whole."""
    original = _fp32_tuning("original", checkpointing=False)
    vedit = _fp32_tuning("vedit")
    torch.testing.assert_close(_prediction(vedit), _prediction(original))
    grads = {}
    for name, tuning in (("original", original), ("vedit", vedit)):
        loss = _prediction(tuning).square().mean()
        loss.backward()
        grads[name] = {n: p.grad for n, p in tuning.unet.unet.named_parameters()
                       if ".attn_temp." in n}
    assert grads["original"].keys() == grads["vedit"].keys() and grads["vedit"]
    for name, grad in grads["original"].items():
        torch.testing.assert_close(grads["vedit"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_memory_model_reproduces_the_measured_original_and_advises() -> None:
    for frames, height, width, peak in memory_model.MEASURED[("tune", "original")][1]:
        predicted = memory_model.predict_peak_gb(frames, height, width, "original")
        assert abs(predicted - peak) < 0.1, (frames, predicted, peak)
    for key in (("tune", "original"), ("tune", "vedit"), ("edit", "vedit")):
        assert memory_model.is_calibrated(*key) == (key in memory_model.MEASURED)
    assert memory_model.predict_peak_gb(24, 512, 512, "vedit") < memory_model.predict_peak_gb(
        24, 512, 512, "original")
    advice = memory_model.advise(128, 512, 512, device_total_gb=24.0)
    assert not advice.fits and 1 <= advice.max_frames < 128 and 64 <= advice.max_side < 512
    assert memory_model.predict_peak_gb(advice.max_frames, 512, 512) <= advice.usable_gb


def test_memory_model_reads_measured_points_from_results() -> None:
    results = {"meta": {"size": "512x512"}, "results": [
        {"kind": "tune", "recipe": "vedit", "frames": 8, "metrics": {"peak_gb": 5.123}},
        {"kind": "unet2d", "recipe": "vedit", "frames": 8, "metrics": {"peak_gb": 4.0}},
        {"kind": "tune", "recipe": "vedit", "frames": 64, "metrics": {}}]}
    assert memory_model.measured_points(results) == {("tune", "vedit"): [(8, 512, 512, 5.12)]}
    fit = memory_model.fit_points("tune", "vedit", [(8, 512, 512, 5.0), (24, 512, 512, 9.0)],
                                  "test")
    assert fit.bytes_per_frame_pixel > 0 and fit.calibrated


@pytest.mark.parametrize("size", ["512", "768x448"])
def test_sizes_parse_as_height_and_width(size: str) -> None:
    height, width = run.parse_size(size, shapes.SD15)
    assert (width, height) == ((512, 512) if size == "512" else (768, 448))
