"""vedit score: the flow metrics on clips made here, the CLIP formulas against transformers, the
command on projects and videos, and the scoring models fetched from a (fake) hub."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import FakeHub, go_offline
from typer.testing import CliRunner

from vedit import tomlio
from vedit.cli import app
from vedit.clip_models import DEFAULT_CLIP_MODEL, PICKSCORE_MODEL, PROCESSOR_REPOS
from vedit.flow import FlowEstimator
from vedit.score import Frames, Scorer, match_frames, video_frames
from vedit.settings import ScoreSettings
from vedit.synthetic import make_clip, pattern
from vedit.tiny_model import build_tiny_clip

runner = CliRunner()


def _frames(images: list[np.ndarray], fps: float = 25.0, label: str = "frames") -> Frames:
    return Frames(label, [i / fps for i in range(len(images))], lambda: iter(images))


def _shuffled(frames: Frames) -> Frames:
    images = list(frames.read())
    order = np.random.default_rng(0).permutation(len(images))
    return _frames([images[i] for i in order], label="shuffled")


@pytest.fixture(scope="module")
def moving(clip_dir: Path) -> Path:
    """A square crossing a gradient, 128x96, 25 frames, as H.264."""
    return make_clip(clip_dir / "moving.mp4", width=128, height=96, fps=25, seconds=1.0,
                     audio=False)


# -- optical flow and the weights-free metrics ---------------------------------------------------


def test_a_known_translation_gives_its_flow() -> None:
    rng = np.random.default_rng(0)
    texture = np.repeat(np.kron(rng.integers(0, 256, (40, 50)), np.ones((4, 4))), 3, axis=1)
    texture = texture.reshape(160, 200, 3).astype(np.uint8)
    first = texture[20:116, 20:148]
    second = texture[22:118, 17:145]  # content moves 3 px right and 2 px up
    flow = FlowEstimator()(first, second)
    inner = flow[16:-16, 16:-16]
    assert np.median(inner[..., 0]) == pytest.approx(3, abs=0.1)
    assert np.median(inner[..., 1]) == pytest.approx(-2, abs=0.1)
    assert np.mean(np.linalg.norm(inner - [3, -2], axis=-1) < 0.5) > 0.9


def test_a_static_clip_scores_zero_against_itself() -> None:
    still = _frames([pattern(96, 64, 3, 10)] * 5)
    result = Scorer(reporter=None).score(still, still)
    assert result.metrics["warp_error"] == pytest.approx(0, abs=1e-6)
    assert result.metrics["motion_alignment"] == pytest.approx(0, abs=1e-6)
    assert len(result.per_frame["warp_error"]) == 4


def test_moving_shapes_score_near_zero_against_themselves_and_worse_shuffled(
        moving: Path) -> None:
    clip = video_frames(moving)
    scorer = Scorer()
    itself = scorer.score(clip, clip).metrics
    shuffled = scorer.score(_shuffled(clip), clip).metrics
    assert itself["motion_alignment"] == 0  # the same frames have the same flow
    assert itself["warp_error"] < 0.01
    assert shuffled["warp_error"] > 5 * itself["warp_error"]
    assert shuffled["motion_alignment"] < -1


def test_frames_are_matched_by_time_when_the_counts_differ() -> None:
    source = _frames([pattern(64, 48, i, 12) for i in range(12)], fps=25)  # 0 to 0.44 s
    every_other = _frames([pattern(64, 48, i, 16) for i in range(0, 16, 2)], fps=12.5)  # 0.56 s
    matching = match_frames(every_other, source)
    assert matching.source_indices == [0, 2, 4, 6, 8, 10]  # the rest lie past the source
    assert matching.video_indices == [0, 1, 2, 3, 4, 5]
    assert "nearest its time" in matching.note and "2 frames of the video" in matching.note
    assert match_frames(source, source).note is None


# -- the CLIP metrics ----------------------------------------------------------------------------


def test_clip_metrics_equal_transformers_own_computation(tiny_clip: Path, moving: Path) -> None:
    """Frame consistency is the mean cosine over all pairs of distinct frames of CLIPModel's image
    embeddings, text alignment 100 x the cosine of each frame with the prompt, averaged."""
    from transformers import CLIPModel, CLIPTokenizer

    from vedit.clip_models import image_processor_class

    prompt = "a white square slides across a gradient"
    clip = video_frames(moving)
    result = Scorer(ScoreSettings(clip_model=str(tiny_clip))).score(clip, clip, prompt)

    model = CLIPModel.from_pretrained(tiny_clip, use_safetensors=True).eval()
    pixels = image_processor_class().from_pretrained(tiny_clip)(
        images=list(clip.read()), return_tensors="pt")["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(tiny_clip)([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)
    similarity = (out.image_embeds @ out.image_embeds.T).double()
    count = len(similarity)
    consistency = (similarity.sum() - similarity.trace()) / (count * (count - 1))
    alignment = 100 * (out.image_embeds @ out.text_embeds.T).double().mean()
    assert result.metrics["clip_frame_consistency"] == pytest.approx(consistency.item(), abs=1e-6)
    assert result.metrics["clip_text_alignment"] == pytest.approx(alignment.item(), abs=1e-5)
    assert result.per_frame["clip_text_alignment"] == pytest.approx(
        (100 * out.image_embeds @ out.text_embeds[0]).tolist(), abs=1e-5)
    assert result.clip_model == str(tiny_clip)
    with pytest.warns(UserWarning, match="longer than"):  # scored cut, as the encoder reads it
        Scorer(ScoreSettings(clip_model=str(tiny_clip))).score(clip, clip, "a square " * 60)


def test_without_the_models_the_clip_metrics_are_null_with_one_notice(moving: Path) -> None:
    result = runner.invoke(app, ["score", str(moving), "--source", str(moving), "--prompt",
                                 "a square", "--json"])
    assert result.exit_code == 0, result.stderr
    [video] = json.loads(result.stdout)["videos"]
    assert video["metrics"]["warp_error"] is not None
    assert video["metrics"]["motion_alignment"] == 0
    for name in ("clip_frame_consistency", "clip_text_alignment", "pickscore"):
        assert video["metrics"][name] is None
    notice = " ".join(result.stderr.split())
    assert notice.count("warning:") == 1 and "vedit fetch-models --scoring" in notice

    named = runner.invoke(app, ["score", str(moving), "--source", str(moving), "--clip-model",
                                "someone/not-fetched"])
    assert named.exit_code == 6 and "vedit fetch-models someone/not-fetched" in named.stderr


def test_scoring_models_fetched_from_the_hub_give_every_metric(
        tiny_clip: Path, tmp_path: Path, fake_hub: FakeHub, moving: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`fetch-models --scoring` takes the CLIP and PickScore with its processor, safetensors only;
    `score` then finds them by name in the cache, offline, as after a real download."""
    from transformers import CLIPModel

    pick = build_tiny_clip(tmp_path / "pick", seed=1)
    processor_files = ["preprocessor_config.json", "tokenizer_config.json",
                       "special_tokens_map.json", "vocab.json", "merges.txt"]
    pickle = {"pytorch_model.bin": b"pickle, never fetched"}
    fake_hub.add_folder(DEFAULT_CLIP_MODEL, tiny_clip, extra=pickle)
    own_processor = {f: b"PickScore's own, unused" for f in processor_files}
    fake_hub.add_repo(PICKSCORE_MODEL, {"config.json": (pick / "config.json").read_bytes(),
                                        "model.safetensors": (pick / "model.safetensors")
                                        .read_bytes(), **pickle, **own_processor})
    fake_hub.add_repo(PROCESSOR_REPOS[PICKSCORE_MODEL], {
        **{f: (pick / f).read_bytes() for f in processor_files},
        "config.json": b"{}", "open_clip_pytorch_model.bin": b"pickle, never fetched"})

    fetched = runner.invoke(app, ["fetch-models", "--scoring", "--json"])
    assert fetched.exit_code == 0, fetched.stderr
    assert [m["name"] for m in json.loads(fetched.stdout)["models"]] == [DEFAULT_CLIP_MODEL,
                                                                         PICKSCORE_MODEL]
    got = {r.path.rsplit("/", 1)[-1] for r in fake_hub.requests if r.method == "GET"
           and "/api/" not in r.path}
    assert not {f for f in got if f.endswith(".bin")}
    assert not [r for r in fake_hub.requests  # the processor comes from LAION's repo only
                if f"/{PICKSCORE_MODEL}/resolve/" in r.path and r.path.endswith(".json")
                and not r.path.endswith("/config.json")]
    assert not fake_hub.unexpected()
    listed = runner.invoke(app, ["fetch-models", "--list", "--json"])
    assert {m["name"]: m["role"] for m in json.loads(listed.stdout)["models"]} == {
        DEFAULT_CLIP_MODEL: "scoring", PICKSCORE_MODEL: "scoring"}
    requests = len(fake_hub.requests)
    go_offline(monkeypatch)
    again = runner.invoke(app, ["fetch-models", PICKSCORE_MODEL])
    assert again.exit_code == 0 and "is ready" in again.stdout

    prompt = "a square"
    result = runner.invoke(app, ["score", str(moving), "--source", str(moving), "--prompt",
                                 prompt, "--json"])
    assert result.exit_code == 0, result.stderr
    assert "warning" not in result.stderr
    [video] = json.loads(result.stdout)["videos"]
    assert all(video["metrics"][m] is not None for m in video["metrics"])
    scale = CLIPModel.from_pretrained(pick).logit_scale.exp().item()
    by_tiny_clip = Scorer(ScoreSettings(clip_model=str(pick))).score(
        video_frames(moving), video_frames(moving), prompt).metrics["clip_text_alignment"]
    assert video["metrics"]["pickscore"] == pytest.approx(by_tiny_clip * scale / 100, rel=1e-5)
    assert len(fake_hub.requests) == requests


# -- the command on a project --------------------------------------------------------------------


@pytest.fixture()
def project(tmp_path: Path, tuned_project: Path) -> Path:
    shutil.copytree(tuned_project, tmp_path / "p")
    return tmp_path / "p"


def test_edit_score_records_the_scores_and_vedit_score_agrees(
        project: Path, tiny_clip: Path, tmp_path: Path, clip_720p: Path) -> None:
    config = tmp_path / "vedit.toml"
    config.write_text(f'[score]\nclip-model = "{tiny_clip}"\n')
    edited = runner.invoke(app, ["edit", str(project), "-p", "a cat is talking", "-p",
                                 "a dog is talking", "--steps", "2", "--score", "--config",
                                 str(config), "--json"])
    assert edited.exit_code == 0, edited.stderr
    edits = json.loads(edited.stdout)["edits"]
    for entry in edits:
        assert set(entry["scores"]) == {"warp_error", "motion_alignment", "pickscore",
                                        "clip_frame_consistency", "clip_text_alignment"}
        assert entry["scores"]["pickscore"] is None  # PickScore was never fetched
        record = tomlio.loads((Path(entry["folder"]) / "edit.toml").read_text())["score"]
        assert record == {"frames": 6, "clip_model": str(tiny_clip)} | {
            k: v for k, v in entry["scores"].items() if v is not None}

    table = tmp_path / "scores.csv"
    scored = runner.invoke(app, ["score", str(project), "--config", str(config), "--json",
                                 "--csv", str(table)])
    assert scored.exit_code == 0, scored.stderr
    videos = json.loads(scored.stdout)["videos"]
    assert [v["name"] for v in videos] == ["a-cat-is-talking", "a-dog-is-talking"]
    for video, entry in zip(videos, edits, strict=True):
        assert video["metrics"] == pytest.approx(entry["scores"])
        assert video["prompt"] == entry["prompt"] and video["frames"] == 6
        assert len(video["per_frame"]["warp_error"]) == 5
    rows = list(csv.DictReader(table.open()))
    assert [r["name"] for r in rows] == ["a-cat-is-talking", "a-dog-is-talking"]
    assert float(rows[0]["warp_error"]) == pytest.approx(videos[0]["metrics"]["warp_error"])
    assert rows[0]["pickscore"] == ""

    human = runner.invoke(app, ["edit", str(project), "-p", "a bird", "--steps", "2",
                                "--score"])
    assert human.exit_code == 0 and "scores: warp_error" in human.stdout
    shown = runner.invoke(app, ["score", str(project), "a-cat-is-talking", "a-bird",
                                "--config", str(config)])
    assert shown.exit_code == 0, shown.stderr
    assert "a-cat-is-talking" in shown.stdout
    assert re.search(r"\d\*", shown.stdout)  # the best of a column is starred

    # Any video against the clip it came from: matched by time, sized as extract sized the
    # frames, so the flow metrics are the project's own.
    one = runner.invoke(app, ["score", str(project / "edits/a-cat-is-talking/video.mp4"),
                              "--source", str(clip_720p), "--json"])
    assert one.exit_code == 0, one.stderr
    [alone] = json.loads(one.stdout)["videos"]
    assert alone["frames"] == 6 and len(alone["notes"]) == 2  # matched by time; scaled
    for name in ("warp_error", "motion_alignment"):
        assert alone["metrics"][name] == pytest.approx(videos[0]["metrics"][name], abs=1e-6)


def test_usage_errors_and_unknown_edits(project: Path, moving: Path) -> None:
    no_source = runner.invoke(app, ["score", str(moving)])
    assert no_source.exit_code == 2 and "--source" in no_source.stderr
    prompt = runner.invoke(app, ["score", str(project), "--prompt", "x"])
    assert prompt.exit_code == 2
    no_edits = runner.invoke(app, ["score", str(project)])
    assert no_edits.exit_code == 4 and "vedit edit" in no_edits.stderr
