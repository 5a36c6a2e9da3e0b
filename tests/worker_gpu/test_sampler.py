import torch

from services.common.engine import SamplingParams, SequenceInput
from services.worker_gpu.sampler import Sampler


def sequence(request_id: str, seed: int, temperature: float = 1.0, top_p: float = 1.0) -> SequenceInput:
    sampling = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p)
    return SequenceInput(request_id, [0], 0, [0], sampling, seed)


def logits_for(probs: list[float], vocab_size: int = 1000) -> torch.Tensor:
    """Logits whose softmax puts ``probs`` on the first tokens and nothing elsewhere."""
    logits = torch.full((1, vocab_size), -1e9)
    logits[0, : len(probs)] = torch.tensor(probs).log()
    return logits


def draw(logits: torch.Tensor, num_draws: int, **sampling) -> list[int]:
    sampler = Sampler()
    return [sampler.sample(logits, [sequence(f"r{seed}", seed, **sampling)])[0] for seed in range(num_draws)]


def test_greedy_picks_argmax():
    logits = logits_for([0.1, 0.6, 0.3])

    assert Sampler().sample(logits, [sequence("r", 0, temperature=0.0)]) == [1]


def test_full_sampling_reaches_every_token():
    tokens = draw(logits_for([0.4, 0.3, 0.2, 0.1]), num_draws=300)

    assert set(tokens) == {0, 1, 2, 3}


def test_top_p_keeps_only_the_nucleus():
    tokens = draw(logits_for([0.4, 0.3, 0.2, 0.1]), num_draws=300, top_p=0.5)

    assert set(tokens) == {0, 1}


def test_top_p_over_flat_distribution_sorts_whole_vocabulary():
    # 2000 equally likely tokens: the nucleus of 0.9 has 1800, more than any topk candidate set.
    logits = logits_for([1 / 2000] * 2000, vocab_size=3000)

    tokens = draw(logits, num_draws=200, top_p=0.9)

    assert max(tokens) < 2000
    assert len(set(tokens)) > 100


def test_generator_is_per_request():
    logits = logits_for([0.25] * 4).expand(2, -1)

    alone = Sampler().sample(logits[:1], [sequence("a", 5)])
    batched = Sampler().sample(logits, [sequence("a", 5), sequence("b", 6)])

    assert batched[0] == alone[0]
