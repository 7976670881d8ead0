"""Clips in the containers people have besides plain mp4, each made in code: frames are found,
timed and decoded as FFmpeg shows them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clips import CONTAINERS, frame_number
from PIL import Image

from vedit.extract import extract
from vedit.settings import ExtractSettings
from vedit.video import probe


@pytest.mark.parametrize("kind", list(CONTAINERS))
def test_valid_clips_of_every_container_give_their_frames(tmp_path: Path, kind: str,
                                                          container_clips: dict[str, Path]
                                                          ) -> None:
    _, first_shown, count = CONTAINERS[kind]
    clip = container_clips[kind]
    info = probe(clip)
    assert info.frame_count == count
    assert info.frame_times[0] == 0 and info.frame_times[-1] == pytest.approx((count - 1) / 25)
    # Frames from the start and from the middle (a seek where the container allows one).
    for start, frames in ((0.0, min(count, 3)), (1.0, 2) if count > 30 else (0.0, 1)):
        result = extract(clip, tmp_path / f"p{start}", ExtractSettings(
            frames=frames, stride=1, start=start, size="96"))
        shown = [frame_number(np.asarray(Image.open(p).convert("RGB"))) for p in result.frames]
        first = first_shown + round(start * 25)
        assert shown == list(range(first, first + frames)), kind
