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
        top_ps = torch.tensor([seq.sampling.top_p for seq in sequences], device=device)
        probs = torch.softmax(logits / temperatures[:, None], dim=-1)

        # Keep the smallest set of most likely tokens whose mass reaches
        # top_p; a token is kept when the mass before it is below top_p.
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_ps[:, None], 0.0)

        # Inverse transform sampling with one uniform draw per request.
        cumulative = sorted_probs.cumsum(dim=-1)
        uniforms = torch.cat([torch.rand(1, generator=self._generator(seq)) for seq in sequences]).to(device)
        targets = uniforms[:, None] * cumulative[:, -1:]
        index = torch.searchsorted(cumulative, targets, right=True).clamp_(max=cumulative.shape[-1] - 1)
        return sorted_ids.gather(1, index).squeeze(1)

    def _generator(self, seq: SequenceInput) -> torch.Generator:
        generator = self._generators.get(seq.request_id)
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(seq.seed)
            self._generators[seq.request_id] = generator
        return generator
