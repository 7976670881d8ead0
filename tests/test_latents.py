"""Encoding and decoding frames with the VAE: slices sized by pixels and precision, so its
memory is bounded at any size; a large frame goes in tiles, so an interrupt is honoured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from vedit import latents
from vedit.edit import decode_latents
from vedit.latents import encode_frames, vae_slice


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


def test_the_vae_takes_as_many_frames_at_once_as_its_pixel_budget_holds(
        vae: AutoencoderKL, monkeypatch: pytest.MonkeyPatch) -> None:
    half = AutoencoderKL.from_config(vae.config).half()
    assert vae_slice(half, 512, 512) == 4  # SD at 512 px in fp16
    assert vae_slice(vae, 1024, 1024) == 1  # SDXL's VAE, upcast to fp32, at 1024 px
    assert vae_slice(half, 768, 1365) == 1 and vae_slice(vae, 128, 128) == 8  # never 0, at most 8

    frames = torch.rand(7, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole, _ = encode_frames(vae, frames)
    monkeypatch.setattr(latents, "VAE_SLICE_BYTES", 3 * 64 * 96 * 4)  # three fp32 frames
    assert encoder_inputs(vae, frames) == [(3, 3, 64, 96)] * 2 + [(1, 3, 64, 96)]
    sliced, _ = encode_frames(vae, frames)
    torch.testing.assert_close(sliced, whole)  # each frame is encoded on its own either way

    decoded: list[int] = []
    hook = vae.decoder.register_forward_pre_hook(lambda _, args: decoded.append(len(args[0])))
    try:
        pixels = decode_latents(vae, sliced.transpose(0, 1))
    finally:
        hook.remove()
    assert decoded == [3, 3, 1] and pixels.shape == (7, 64, 96, 3)
