"""The completion cache key covers what changes a greedy completion and nothing else."""

from services.admission.cache_client import completion_key
from tenantserve.v1 import common_pb2, inference_pb2


def greedy_request(content: str = "Name a colour.", max_tokens: int = 8) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="smollm2-135m-instruct",
        messages=inference_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)]),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
    )


def test_key_ignores_request_bookkeeping() -> None:
    plain = greedy_request()
    decorated = greedy_request()
    decorated.client_request_id = "abc"
    decorated.service_class = common_pb2.SERVICE_CLASS_BATCH
    decorated.sampling.seed = 42

    assert completion_key(plain) == completion_key(decorated)


def test_key_covers_prompt_and_sampling() -> None:
    keys = {
        completion_key(greedy_request()),
        completion_key(greedy_request(content="Name a color.")),
        completion_key(greedy_request(max_tokens=9)),
    }
    with_stop = greedy_request()
    with_stop.sampling.stop.append(".")
    keys.add(completion_key(with_stop))
    other_model = greedy_request()
    other_model.model = "another-model"
    keys.add(completion_key(other_model))

    assert len(keys) == 5


def test_sampled_or_opted_out_requests_have_no_key() -> None:
    sampled = greedy_request()
    sampled.sampling.temperature = 0.5
    opted_out = greedy_request()
    opted_out.skip_completion_cache = True

    assert completion_key(sampled) is None
    assert completion_key(opted_out) is None
