"""The benchmarks' mechanics on the CPU, and vedit's speed levers keep results equal.

The benchmarks time nothing here (no test may depend on timing): these tests check what the
figures are made of: the recipes alternate (ABAB) over the repeats, every figure has its
median and spread, the edit row runs `vedit.edit.edit` itself and the tune-run row
`vedit.tune.tune`, the device table matches exact names, failed steps are noted, FLOPs are
counted as documented. And each lever vedit pulls by default for speed (gradient
checkpointing, fused AdamW, cached latents, bf16 frozen weights, LoRA instead of full query
updates) gives the same results as the plain path, within tolerance, on the tiny shapes.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from einops import rearrange

from vedit import edit as edit_stage
from vedit.latents import FrameLatents, encode_frames
from vedit.settings import TuneSettings

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str) -> ModuleType:
    """Import a script of benchmarks/ (they import each other by plain name, as scripts)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


run = _benchmark("run")
recipes = _benchmark("recipes")
shapes = _benchmark("shapes")
stages = _benchmark("stages")
flops = _benchmark("flops")

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


def _spy(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[dict[str, Any]]:
    """Wrap `owner.name` so that each call's arguments are recorded; it still runs."""
    real, calls = getattr(owner, name), []

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append({"args": args, **kwargs})
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.mark.slow
def test_cpu_form_gives_every_row_with_its_spread_flops_and_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(stages, "import_seconds", lambda module: 1.5)  # timed in its own test
    tunes = _spy(monkeypatch, stages, "tune")
    edits = _spy(monkeypatch, edit_stage, "edit")
    argv = ["--tiny", "--json", "--frames", "2", "--repeats", "2", "--steps", "1", "--warmup",
            "1", "--run-steps", "4", "--edit-steps", "1", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["command"] == "python benchmarks/run.py " + " ".join(argv)
    assert data["meta"]["commit"] == run.source_commit() and data["meta"]["commit"]
    rows = {(row["row"], row["frames"]): row for row in data["table"]}
    for label, recipes_measured in (("tune step (s)", 2), ("same step, plain 2D UNet (s)", 2),
                                    ("model TFLOP/s", 2), ("hardware TFLOP per step (as run)", 2),
                                    ("edit end to end (s)", 2),
                                    ("edit with a cached inversion (s)", 2),
                                    ("vedit tune: 500 steps, projected (s)", 1),
                                    ("vedit tune: whole command peak memory (GB)", 0)):
        row = rows.get((label, 2))
        if not recipes_measured:
            assert row is None  # no GPU, no memory rows
            continue
        figures = [row[r] for r in ("original", "vedit") if row[r]]
        assert len(figures) == recipes_measured, label
        for figure in figures:
            assert figure["min"] <= figure["median"] <= figure["max"] and figure["min"] > 0
            assert figure["repeats"] == (1 if "TFLOP per" in label else 2), label
    assert rows[("tune step (s)", 2)]["ratio"]["repeats"] == 2  # paired, repeat by repeat
    results = {(r["kind"], r["recipe"]): r for r in data["results"]}
    for recipe in ("original", "vedit"):
        tune_result = results[("tune", recipe)]
        counts = {k: tune_result["metrics"][f"{k}_tflop"]["median"]
                  for k in ("forward", "model", "hardware")}
        assert 0 < counts["forward"] < counts["model"] <= counts["hardware"]
        assert tune_result["checked_steps"] == 2 and tune_result["failed_steps"] == 0
        assert all(r["predicted_peak_gb"] is None for r in data["results"])
    # the stage rows ran vedit's own stage functions, models in memory for the edits
    assert [call["args"][1].steps for call in tunes] == [4, 4, 1]  # 2 repeats, the edit's
    models = {id(call["models"]) for call in edits}
    assert len(edits) == 1 + 2 * 2 and len(models) == 1 and None not in models
    assert isinstance(edits[0]["models"], edit_stage.EditModels)
    vedit_edit = results[("edit", "vedit")]["metrics"]
    assert vedit_edit["import_s"]["median"] == 1.5 and vedit_edit["load_s"]["median"] > 0
    assert len(vedit_edit["total_s"]["values"]) == len(vedit_edit["cached_s"]["values"]) == 2
    table = (tmp_path / "results.md").read_text()
    assert f"(commit {run.source_commit()})" in table and "| tune step (s) | 2 |" in table
    assert "| gradient checkpointing | on | off |" in table  # the CPU's unlike levers, listed


class _FakeTuning:
    """A recipe's tuning state that records when it steps; vedit's third step is skipped."""

    def __init__(self, recipe: str, order: list[str]) -> None:
        self.recipe, self.order, self.steps = recipe, order, 0
        self.bench, self.checkpointing, self.levers = BENCH, True, {"trained": recipe}

    def activate(self) -> None:
        self.order.append(self.recipe)

    def step(self) -> object:
        self.steps += 1
        return recipes.StepCheck(0.5, applied=not (self.recipe == "vedit" and self.steps == 3))

    def release(self) -> None:
        pass


def test_recipes_alternate_block_by_block_and_failed_steps_are_noted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    monkeypatch.setattr(run, "build_tuning",
                        lambda recipe, *args, **kwargs: _FakeTuning(recipe, order))
    argv = ["--tiny", "--rows", "tune", "--frames", "2", "--repeats", "3", "--steps", "2",
            "--warmup", "0", "--flops", "off", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    assert order == ["original", "vedit"] * 3  # ABAB, one block of steps each time
    data = json.loads((tmp_path / "results.json").read_text())
    results = {r["recipe"]: r for r in data["results"]}
    assert results["original"]["metrics"]["step_s"]["repeats"] == 3
    assert (results["original"]["failed_steps"], results["vedit"]["failed_steps"]) == (0, 1)
    assert results["vedit"]["note"].startswith("1 of 6 timed steps had")
    assert "tune vedit at 2 frames: 1 of 6" in (tmp_path / "results.md").read_text()


def test_edits_alternate_full_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    calls: list[tuple[str, int, bool]] = []

    def editor(recipe: str) -> Any:
        def edit(steps: int, guidance: float, cached: bool) -> dict[str, float]:
            calls.append((recipe, steps, cached))
            return {"total": 2.0, "invert": 1.0, "sample": 0.5, "decode_write": 0.5}
        return lambda task, runner: run.Editor(edit, 0, {}, {"weights": recipe})

    monkeypatch.setattr(run, "vedit_editor", editor("vedit"))
    monkeypatch.setattr(run, "original_editor", editor("original"))
    assert run.main(["--tiny", "--rows", "edit", "--edit-frames", "2", "--edit-steps", "5",
                     "--out", str(tmp_path)]) == 0
    warm_up = [("original", 2, False), ("vedit", 2, False)]
    one_repeat = [("original", 5, False), ("vedit", 5, False), ("original", 5, True),
                  ("vedit", 5, True)]
    assert calls == warm_up + one_repeat * 3
    data = json.loads((tmp_path / "results.json").read_text())
    metrics = data["results"][0]["metrics"]
    assert metrics["sample_step_s"]["median"] == 0.1 and metrics["total_s"]["repeats"] == 3


def test_a_spent_budget_skips_every_row_and_still_writes(tmp_path: Path) -> None:
    assert run.main(["--tiny", "--frames", "2", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"] and all(r["note"] == "not run: time budget" and not r["metrics"]
                                   for r in data["results"])
    assert "not run: time budget" in (tmp_path / "results.md").read_text()


def _fake_build(recipe: str, frames: int, *args: object, **kwargs: object) -> _FakeTuning:
    """A GPU's answers without a GPU: 4 frames and more run out of memory; 3 is a bug."""
    if frames == 3:
        raise ValueError("a bug\nwith details")
    if frames >= 4:
        raise torch.OutOfMemoryError("CUDA out of memory.")
    return _FakeTuning("original", [])


def test_out_of_memory_is_noted_and_longer_clips_are_not_tried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "build_tuning", _fake_build)
    argv = ["--tiny", "--rows", "tune", "--frames", "2,4,8,3", "--keep-going", "--flops", "off",
            "--out", str(tmp_path)]
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
    args = run.parse_args(["--frames", "8,24,64", "--edit-frames", "8,24", "--run-frames", "24"])
    order = [(t.frames, t.kind) for t in run.plan(args)]
    assert order == [(8, "tune"), (8, "unet2d"), (8, "edit"), (24, "tune"), (24, "unet2d"),
                     (24, "tune-run"), (24, "edit"), (64, "tune"), (64, "unet2d")]


def test_bf16_peaks_match_exact_device_names_only() -> None:
    assert run.bf16_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert run.bf16_peak("NVIDIA H200") == 989.0 and run.bf16_peak("NVIDIA H200 NVL") == 835.0
    assert run.bf16_peak("NVIDIA L40") == 181.0 and run.bf16_peak("NVIDIA L4") == 121.0
    assert run.bf16_peak("NVIDIA L40S") == 362.0
    assert run.bf16_peak("NVIDIA H100") is None and run.bf16_peak("Some Future GPU") is None
    assert run.peak_tflops(CPU, 500.0) == (500.0, "--peak")


def test_a_skipped_update_fails_the_step_check() -> None:
    tuning = _fp32_tuning("vedit")
    assert tuning.step().ok
    tuning.optimizer._is_overflow = True  # what accelerate's fp16 gradient scaler sets
    assert not tuning.step().ok
    assert not recipes.StepCheck(float("nan"), applied=True).ok


def test_tune_run_reads_steps_and_checkpoints_from_the_stage_progress() -> None:
    """8 steps of 1 s; a checkpoint after steps 4 and 8 takes 3 s; the run took 40 s."""
    timeline = stages.Timeline()
    with timeline.task("Loading a model", total=5) as task:
        task.advance(5)
    with timeline.task("tuning", total=8) as task:
        times = timeline.tasks[-1]
        times.started, ends = 10.0, [10.0, 11, 12, 13, 14, 18, 19, 20, 21]
        times.marks = [(at, float(step)) for step, at in enumerate(ends)]
    times.ended = 24.0
    settings = TuneSettings(prompt="p", steps=8, checkpoint_every=4)
    done = stages.read_tune_run(timeline, settings, command_s=40.0, peak_gb=None)
    assert (done.step_s, done.checkpoint_s, done.checkpoints) == (1.0, 3.0, 2)
    assert done.projected_s == 40.0 + (500 - 8) * 1.0 and done.loop_s == 14.0


def test_import_seconds_come_from_a_fresh_interpreter() -> None:
    assert 0 < stages.import_seconds("json") < 60


def test_fused_attention_is_counted_with_its_backward_recomputation() -> None:
    query = torch.zeros(1, 2, 16, 8, device="meta", requires_grad=True)

    def attention() -> None:
        torch.nn.functional.scaled_dot_product_attention(query, query, query).sum().backward()

    plain = flops.count(attention)
    with flops.fused_attention():
        fused = flops.count(attention)
    assert fused * 6 == plain * 7  # 2 + 5 products instead of 2 + 4


def test_flop_counts_from_a_second_process_are_merged_when_rendering(tmp_path: Path) -> None:
    step = run.Stat([0.5, 0.25])
    tuned = run.Result("tune", "vedit", 8, {"step_s": step},
                       levers={"gradient checkpointing": "on"})
    meta = {**dict.fromkeys(("device", "torch", "diffusers", "transformers", "accelerate",
                             "peft", "vedit", "commit", "python", "command", "date"), "x"),
            "bf16_peak_tflops": 100.0, "bf16_peak_source": "test", "shapes": "sd15",
            "size": "512x512", "repeats": 2, "steps": 4, "warmup": 2, "run_steps": 20,
            "edit_steps": 50, "guidance": 12.5, "budget_s": None, "wall_s": 1.0}
    run.write_results(tmp_path, meta, [tuned], None)
    counts = tmp_path / "flops.json"
    counts.write_text(json.dumps([{"recipe": "vedit", "unet": "inflated", "frames": 8,
                                   "size": 512, "checkpointing": True, "forward_tflop": 1.0,
                                   "model_tflop": 2.0, "hardware_tflop": 3.0}]))
    data = run.render(run.parse_args(["--render", "--out", str(tmp_path), "--flops-from",
                                      str(counts)]))
    rows = {row["row"]: row["vedit"] for row in data["table"]}
    assert rows["model TFLOP/s"]["values"] == [4.0, 8.0]
    assert rows["model FLOP/s, share of the bf16 peak (%)"]["median"] == 6.0


def test_a_predicted_row_appears_only_where_a_predictor_gave_a_figure() -> None:
    measured = run.Result("edit", "vedit", 8, {"peak_gb": run.Stat([3.0, 3.5, 3.25])})
    rows = run.table_rows([measured], None)
    assert [row["row"] for row in rows] == ["edit peak memory (GB)"]  # no prediction, none shown
    assert run.cell(rows[0]["vedit"]) == "3.25 (3-3.5)"
    predicted = run.Result("edit", "vedit", 8, {"peak_gb": run.Stat([3.0])},
                           predicted_peak_gb=2.5)
    other = run.Result("edit", "original", 8, {"peak_gb": run.Stat([5.0])})
    rows = run.table_rows([predicted, other], None)
    assert [row["row"] for row in rows] == ["edit peak memory (GB)",
                                            "edit peak memory predicted (GB)"]
    assert [run.predicted_cell(rows[1][r]) for r in ("original", "vedit")] == ["-", "2.5"]


def test_predict_gives_every_planned_row_without_running_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    measured = _spy(monkeypatch, run.Runner, "measure")
    assert run.main(["--tiny", "--predict", "--json", "--frames", "2,4", "--edit-frames", "2",
                     "--rows", "tune,tune-run,edit", "--recipes", "vedit",
                     "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert not measured and not (tmp_path / "results.json").exists()
    assert json.loads((tmp_path / "predicted.json").read_text()) == printed
    peaks = {(p["row"], p["recipe"], p["frames"]): p["predicted_peak_gb"] for p in printed}
    # No tune-run row: a whole command (loading, the VAE, checkpoints) is not predicted.
    assert set(peaks) == {("tune", "vedit", 2), ("tune", "vedit", 4), ("edit", "vedit", 2)}
    assert peaks[("edit", "vedit", 2)] > 0
    assert 0 < peaks[("tune", "vedit", 2)] < peaks[("tune", "vedit", 4)]  # more activations
    # A GPU run shows them next to what it measured, row by row (unet2d is "tune_2d").
    results = [run.Result("tune", "vedit", 4, {"peak_gb": run.Stat([1.0])}),
               run.Result("unet2d", "vedit", 2, {"peak_gb": run.Stat([0.5])}),
               run.Result("edit", "original", 2, {"peak_gb": run.Stat([2.0])})]
    run.merge_predicted(results, [*printed, {"recipe": "vedit", "row": "tune_2d", "frames": 2,
                                             "predicted_peak_gb": 0.4}])
    assert [r.predicted_peak_gb for r in results] == [peaks[("tune", "vedit", 4)], 0.4, None]


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


@pytest.mark.parametrize("size", ["512", "768x448"])
def test_sizes_parse_as_height_and_width(size: str) -> None:
    height, width = run.parse_size(size, shapes.SD15)
    assert (width, height) == ((512, 512) if size == "512" else (768, 448))
