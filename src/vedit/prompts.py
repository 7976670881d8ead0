"""Prompts: read from a file, encoded to text-encoder states with a warning (not silence) when
one is cut short."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vedit.errors import BadInputError
from vedit.progress import Reporter

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

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


def warn_if_truncated(tokenizer: CLIPTokenizer, prompt: str, limit: int,
                      reporter: Reporter) -> None:
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) <= limit:
        return
    kept = tokenizer.decode(ids[1:limit - 1])
    reporter.warn(f"The prompt is {len(ids)} tokens; the text encoder reads {limit}, so it was "
                  f"cut after: {kept!r}.")
