"""Optical flow (OpenCV's DIS, no weights) and the two temporal metrics built on it.

For each pair of consecutive frames `t, t+1` of a source and of an edit of it:

- warp error (temporal flicker): the edit's frame t+1 warped back onto frame t by the
  *source's* flow, compared with the edit's frame t where the source's forward and backward
  flows agree (elsewhere the pixel is occluded or left the picture and has no match);
- motion error: the end-point error between the edit's own flow and the source's.

A flow field is `(h, w, 2)` float32 in pixels: the pixel at `(x, y)` of the first frame
moves to `(x + u, y + v)` in the second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Forward-backward consistency (Sundaram, Brox & Keutzer 2010, as Ruder et al. 2016 use it for
#: video style transfer): a pixel is reliable when |F + B|^2 < ALPHA (|F|^2 + |B|^2) + BETA.
ALPHA = 0.01
BETA = 0.5


class FlowEstimator:
    """DIS optical flow at OpenCV's "medium" preset, on grey frames; one per thread."""

    def __init__(self) -> None:
        import cv2

        self._dis = cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Flow from RGB frame `first` to `second` (same size), `(h, w, 2)` float32."""
        # No flow given: DIS starts from none (OpenCV's stubs omit that None is allowed, and
        # any array passed instead changes the result).
        flow = self._dis.calc(_grey(first), _grey(second), None)  # type: ignore[call-overload]
        return np.asarray(flow, dtype=np.float32)


def _grey(frame: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """`image` sampled at each pixel's flow target, bilinearly: `out(x) = image(x + flow(x))`."""
    import cv2

    map_x, map_y = _targets(flow)
    return np.asarray(cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REPLICATE))


def _targets(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    height, width = flow.shape[:2]
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
    return grid_x + flow[..., 0], grid_y + flow[..., 1]


def reliable(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Pixels of the first frame whose forward flow lands inside the second frame and is undone
    by the backward flow found there: `(h, w)` bool."""
    height, width = forward.shape[:2]
    map_x, map_y = _targets(forward)
    inside = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
    back = warp(backward, forward)
    mismatch = np.sum((forward + back) ** 2, axis=-1)
    allowed = ALPHA * (np.sum(forward ** 2, axis=-1) + np.sum(back ** 2, axis=-1)) + BETA
    return np.asarray(inside & (mismatch < allowed), dtype=bool)


@dataclass(frozen=True)
class PairScores:
    """The temporal metrics of one pair of consecutive frames."""

    warp_error: float | None  # None when no pixel of the pair is reliable
    end_point_error: float


def score_pair(flow: FlowEstimator, source: tuple[np.ndarray, np.ndarray],
               edit: tuple[np.ndarray, np.ndarray]) -> PairScores:
    """Warp error and end-point error of the edit's frames `t, t+1` against the source's (all
    RGB uint8 of one size)."""
    forward = flow(source[0], source[1])
    backward = flow(source[1], source[0])
    mask = reliable(forward, backward)
    warp_error = None
    if mask.any():
        warped = warp(edit[1], forward).astype(np.float32)
        difference = np.abs(warped - edit[0].astype(np.float32)) / 255.0
        warp_error = float(difference[mask].mean())
    edit_flow = flow(edit[0], edit[1])
    end_point_error = float(np.linalg.norm(edit_flow - forward, axis=-1).mean())
    return PairScores(warp_error, end_point_error)
