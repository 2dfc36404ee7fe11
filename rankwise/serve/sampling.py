"""Next-token choice for a batch of rows with their own temperature and top-p, without host synchronisation.

Greedy rows (temperature 0) take argmax(logits). Sampled rows draw from softmax(logits / T) restricted to the
nucleus (Holtzman et al. 2020): the smallest set of most likely tokens whose mass reaches top_p. The draw uses
the exponential-race form of the Gumbel-max trick, argmax_i p_i / E_i with E_i ~ Exp(1), which equals a draw
from p and needs no `multinomial` (so nothing waits on the device).
"""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, all_greedy: bool,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, V) float32; temperature, top_p: (B,) float32 -> token ids (B,) int64."""
    greedy = logits.argmax(dim=-1)
    if all_greedy:
        return greedy
    probs = torch.softmax(logits / temperature.clamp_min(1e-5)[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p[:, None], 0.0)  # the top token always stays
    race = torch.empty_like(sorted_p).exponential_(generator=generator)
    choice = (sorted_p / race).argmax(dim=-1, keepdim=True)
    drawn = order.gather(1, choice)[:, 0]
    return torch.where(temperature > 0, drawn, greedy)


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index where the earliest stop string starts in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could begin a stop string (not yet safe to stream)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-k:]):
                keep = max(keep, k)
                break
    return keep
