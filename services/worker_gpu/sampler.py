"""Token sampling: greedy at temperature 0, else temperature plus top-p.

Each request draws its uniform random numbers from its own CPU
torch.Generator seeded with the request's seed, so a request's draws do not
depend on the other requests in the batch or on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.common.engine import SequenceInput


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def sample(self, logits: torch.Tensor, sequences: Sequence[SequenceInput]) -> list[int]:
        """Pick one token per row of ``logits`` [N, vocab] (float32)."""
        token_ids = logits.argmax(dim=-1)
        sampled_rows = [row for row, seq in enumerate(sequences) if not seq.sampling.is_greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            chosen = self._sample_rows(logits[rows], [sequences[row] for row in sampled_rows])
            token_ids = token_ids.index_copy(0, rows, chosen)
        return token_ids.tolist()

    def _sample_rows(self, logits: torch.Tensor, sequences: Sequence[SequenceInput]) -> torch.Tensor:
        device = logits.device
        temperatures = torch.tensor([seq.sampling.temperature for seq in sequences], device=device)
        probs = torch.softmax(logits / temperatures[:, None], dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=self._generator(seq)) for seq in sequences]).to(device)

        token_ids = torch.empty(len(sequences), dtype=torch.long, device=device)
        full_rows = [row for row, seq in enumerate(sequences) if seq.sampling.top_p >= 1.0]
        nucleus_rows = [row for row, seq in enumerate(sequences) if seq.sampling.top_p < 1.0]
        if full_rows:
            rows = torch.tensor(full_rows, device=device)
            token_ids[rows] = _inverse_cdf(probs[rows], uniforms[rows])
        if nucleus_rows:
            rows = torch.tensor(nucleus_rows, device=device)
            top_ps = torch.tensor([sequences[row].sampling.top_p for row in nucleus_rows], device=device)
            token_ids[rows] = _sample_nucleus(probs[rows], top_ps, uniforms[rows])
        return token_ids

    def _generator(self, seq: SequenceInput) -> torch.Generator:
        generator = self._generators.get(seq.request_id)
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(seq.seed)
            self._generators[seq.request_id] = generator
        return generator


# Candidate counts tried before sorting the whole vocabulary: the nucleus
# usually lies within the most likely 64 tokens, and topk is much cheaper
# than a full sort on CPU.
NUCLEUS_CANDIDATES = (64, 1024)


def _sample_nucleus(probs: torch.Tensor, top_ps: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, sorted_ids = _nucleus_candidates(probs, top_ps)
    # A token is kept when the mass of the tokens before it is below top_p.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_ps[:, None], 0.0)
    return sorted_ids.gather(1, _inverse_cdf(sorted_probs, uniforms)[:, None]).squeeze(1)


def _nucleus_candidates(probs: torch.Tensor, top_ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the most likely tokens in descending order, enough of them to hold each row's nucleus."""
    for num_candidates in NUCLEUS_CANDIDATES:
        if num_candidates >= probs.shape[-1]:
            break
        top_probs, top_ids = probs.topk(num_candidates, dim=-1)
        if bool((top_probs.sum(dim=-1) >= top_ps).all()):
            return top_probs, top_ids
    return probs.sort(dim=-1, descending=True)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Pick index i of each row with probability weights[i] / sum(weights), from one uniform draw."""
    cumulative = weights.cumsum(dim=-1)
    targets = uniforms[:, None] * cumulative[:, -1:]
    return torch.searchsorted(cumulative, targets, right=True).squeeze(1).clamp_(max=weights.shape[-1] - 1)
