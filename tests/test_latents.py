"""Encoding frames with the VAE: a large frame goes in tiles, so an interrupt is honoured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from vedit.latents import encode_frames


@pytest.fixture(scope="module")
def vae(tiny_model: Path) -> AutoencoderKL:
    model: AutoencoderKL = AutoencoderKL.from_pretrained(tiny_model / "vae")
    return model


def encoder_inputs(vae: AutoencoderKL, frames: torch.Tensor) -> list[tuple[int, ...]]:
    """The shapes the VAE's encoder was run on while encoding `frames`."""
    shapes: list[tuple[int, ...]] = []
    hook = vae.encoder.register_forward_pre_hook(lambda _, args: shapes.append(args[0].shape))
    try:
        mean, std = encode_frames(vae, frames)
    finally:
        hook.remove()
    assert mean.shape == std.shape == (len(frames), 4, frames.shape[2] // 8, frames.shape[3] // 8)
    return shapes


def test_frames_of_the_usual_size_are_encoded_whole(vae: AutoencoderKL) -> None:
    assert encoder_inputs(vae, torch.zeros(3, 3, 64, 96)) == [(3, 3, 64, 96)]


def test_a_large_frame_is_encoded_tile_by_tile_and_an_interrupt_stops_it(
        vae: AutoencoderKL) -> None:
    frames = torch.zeros(2, 3, 200, 160)  # the tiny VAE's tiles are 64 px: 5 x 4 per frame
    shapes = encoder_inputs(vae, frames)
    assert len(shapes) == 2 * 5 * 4 and max(s[2] * s[3] for s in shapes) == 64 * 64
    assert not vae.use_tiling  # left as it was

    calls = 0

    def interrupt(*_: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt  # where a Ctrl-C or SIGTERM handler raises it

    hook = vae.encoder.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            encode_frames(vae, frames)
    finally:
        hook.remove()
    assert calls == 3 and not vae.use_tiling
