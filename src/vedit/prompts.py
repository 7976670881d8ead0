"""Prompts: read from a file, encoded to text-encoder states with a warning (not silence) when
one is cut short; with an SDXL base, to its whole conditioning (`Conditioning`). Reading them
needs no torch (the CLI reads a prompts file before the project's lock is checked)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vedit.conditioning import Conditioning, warn_if_truncated
from vedit.errors import BadInputError
from vedit.progress import Reporter

if TYPE_CHECKING:
    import torch

    from vedit.models import Components


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file (or stdin for '-'), one a line, in UTF-8; blank lines and # comments
    skipped."""
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"Cannot read --prompts-file {path}: {exc.strerror}.",
                            "Check the path.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        where = "stdin" if str(path) == "-" else str(path)
        raise BadInputError(f"Line {line} of --prompts-file {where} is not valid UTF-8.",
                            "Save the file as UTF-8, e.g. with `iconv -t UTF-8`.") from None
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def encode_prompts(components: Components, prompts: Sequence[str],
                   reporter: Reporter | None = None) -> torch.Tensor:
    """CLIP hidden states `(n, tokens, d)` of `prompts`, as diffusers' SD pipelines compute
    them (the last layer of the text encoder, which SD 2.x configs already stop one early)."""
    reporter = reporter or Reporter()
    tokenizer, encoder = components.tokenizer, components.text_encoder
    limit = tokenizer.model_max_length
    for prompt in prompts:
        warn_if_truncated(tokenizer, prompt, limit, reporter)
    ids = tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True,
                    return_tensors="pt").input_ids
    import torch

    device = next(encoder.parameters()).device
    with torch.no_grad():
        states: torch.Tensor = encoder(ids.to(device))[0]
    return states


def encode_conditioning(components: Components, prompts: Sequence[str],
                        time_ids: torch.Tensor | None = None,
                        reporter: Reporter | None = None) -> Conditioning:
    """The conditioning of `prompts` on this base: SD 1.x/2.x's text states, or SDXL's states,
    pooled text and the clip's size ids `time_ids` `(1, 6)` (`sdxl.project_time_ids`)."""
    if components.text_encoder_2 is None:
        return Conditioning(encode_prompts(components, prompts, reporter))
    from vedit.sdxl import encode_sdxl_prompts, sdxl_conditioning

    return sdxl_conditioning(encode_sdxl_prompts(components, prompts, reporter), time_ids)


def negative_conditioning(components: Components, negative_prompt: str,
                          time_ids: torch.Tensor | None = None,
                          reporter: Reporter | None = None) -> Conditioning:
    """The unconditional branch of guidance for one clip: the negative prompt's conditioning; on
    an SDXL base with no negative prompt, its own empty conditioning (zeros where the model
    forces them)."""
    if components.text_encoder_2 is None or negative_prompt:
        return encode_conditioning(components, [negative_prompt], time_ids, reporter)
    from vedit.sdxl import sdxl_conditioning, unconditional_sdxl

    return sdxl_conditioning(unconditional_sdxl(components), time_ids)
