"""What the UNet is conditioned on (`Conditioning`), and the warning every text encoder gives
when a prompt is cut short: shared by SD's prompt encoding (prompts.py), SDXL's (sdxl.py) and
the sampler, below all three so that none imports another through it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vedit.progress import Reporter

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer


def warn_if_truncated(tokenizer: CLIPTokenizer, prompt: str, limit: int,
                      reporter: Reporter) -> None:
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) <= limit:
        return
    kept = tokenizer.decode(ids[1:limit - 1])
    reporter.warn(f"The prompt is {len(ids)} tokens; the text encoder reads {limit}, so it was "
                  f"cut after: {kept!r}.")


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, for `b` clips: the prompts' states `(b, n, d)` and, for an
    SDXL base, the added conditioning its UNet takes (`text_embeds` `(b, d')`, `time_ids`
    `(b, 6)`); None for SD 1.x/2.x."""

    states: torch.Tensor
    added: Mapping[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning(self.states.to(device), None if self.added is None else {
            name: value.to(device) for name, value in self.added.items()})

    def expand(self, count: int) -> Conditioning:
        """One clip's conditioning for `count` clips."""
        return Conditioning(self.states.expand(count, -1, -1), None if self.added is None else {
            name: value.expand(count, -1) for name, value in self.added.items()})

    def cat(self, other: Conditioning) -> Conditioning:
        """These clips', then `other`'s, as one batch."""
        import torch

        states = torch.cat([self.states, other.states])
        if self.added is None or other.added is None:
            return Conditioning(states)
        return Conditioning(states, {name: torch.cat([value, other.added[name]])
                                     for name, value in self.added.items()})
