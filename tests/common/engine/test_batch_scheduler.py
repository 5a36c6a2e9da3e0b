from services.common.engine.batch_scheduler import BatchConfig, BatchScheduler
from services.common.engine.block_pool import BlockPool
from services.common.engine.request import RequestStatus

from .support import make_request


def make_scheduler(
    num_blocks: int = 64, max_batch_size: int = 4, max_waiting: int = 8, max_num_prefill_tokens: int = 2048
) -> BatchScheduler:
    config = BatchConfig(
        max_batch_size=max_batch_size,
        max_waiting=max_waiting,
        max_model_len=256,
        max_num_prefill_tokens=max_num_prefill_tokens,
    )
    return BatchScheduler(config, BlockPool(num_blocks, block_size=16))


def test_waiting_requests_join_running_batch():
    scheduler = make_scheduler()
    first = make_request("first")
    scheduler.add(first)
    step = scheduler.schedule()
    assert step.prefills == [first]
    assert step.decodes == []

    second = make_request("second")
    scheduler.add(second)
    step = scheduler.schedule()

    assert step.prefills == [second]
    assert step.decodes == [first]
    assert second.status is RequestStatus.RUNNING


def test_batch_never_exceeds_max_batch_size():
    scheduler = make_scheduler(max_batch_size=2)
    requests = [make_request(f"r{i}") for i in range(3)]
    for request in requests:
        scheduler.add(request)

    step = scheduler.schedule()

    assert step.prefills == requests[:2]
    assert scheduler.num_running == 2
    assert list(scheduler.waiting) == [requests[2]]


def test_finished_request_frees_its_slot_for_the_next():
    scheduler = make_scheduler(max_batch_size=1)
    first, second = make_request("first"), make_request("second")
    scheduler.add(first)
    scheduler.add(second)
    scheduler.schedule()

    scheduler.finish(first)
    step = scheduler.schedule()

    assert step.prefills == [second]
    assert step.decodes == []
    assert first.status is RequestStatus.FINISHED


def test_admission_waits_for_free_blocks():
    # 10 prompt + 8 completion tokens need 2 blocks of 16 tokens.
    scheduler = make_scheduler(num_blocks=3)
    first, second = make_request("first"), make_request("second")
    scheduler.add(first)
    scheduler.add(second)

    step = scheduler.schedule()
    assert step.prefills == [first]
    assert scheduler.block_pool.num_free_blocks == 1

    scheduler.finish(first)
    assert scheduler.block_pool.num_free_blocks == 3
    step = scheduler.schedule()
    assert step.prefills == [second]


def test_admission_keeps_arrival_order():
    scheduler = make_scheduler(num_blocks=4)
    large = make_request("large", num_prompt_tokens=40, max_tokens=20)  # 4 blocks
    small = make_request("small")  # 2 blocks
    scheduler.add(make_request("running"))  # 2 blocks
    scheduler.schedule()
    scheduler.add(large)
    scheduler.add(small)

    step = scheduler.schedule()

    # small would fit, but it must not overtake large.
    assert step.prefills == []
    assert list(scheduler.waiting) == [large, small]


def test_reservation_is_capped_at_context_length():
    scheduler = make_scheduler()
    request = make_request("long", num_prompt_tokens=100, max_tokens=10_000)

    # max_model_len 256 needs 16 blocks of 16 tokens.
    assert scheduler.num_blocks_needed(request) == 16


def test_waiting_queue_is_bounded():
    scheduler = make_scheduler(max_waiting=2)
    scheduler.add(make_request("first"))
    scheduler.add(make_request("second"))

    assert not scheduler.can_add()


def test_prefill_token_budget_defers_prompts():
    scheduler = make_scheduler(max_num_prefill_tokens=25)
    requests = [make_request(f"r{i}", num_prompt_tokens=10) for i in range(3)]
    for request in requests:
        scheduler.add(request)

    first_step = scheduler.schedule()
    second_step = scheduler.schedule()

    assert first_step.prefills == requests[:2]
    assert second_step.prefills == requests[2:]
    assert second_step.decodes == requests[:2]


def test_prompt_over_budget_still_runs_alone():
    scheduler = make_scheduler(max_num_prefill_tokens=5)
    request = make_request("long", num_prompt_tokens=50)
    scheduler.add(request)

    assert scheduler.schedule().prefills == [request]


def test_finish_of_waiting_request_removes_it():
    scheduler = make_scheduler()
    request = make_request("waiting")
    scheduler.add(request)

    scheduler.finish(request)

    assert scheduler.num_waiting == 0
    assert scheduler.schedule().is_empty


def test_prefilled_prompt_blocks_are_reused():
    scheduler = make_scheduler()
    first = make_request("first", num_prompt_tokens=40)
    scheduler.add(first)
    scheduler.schedule()
    scheduler.cache_prompt_blocks(first)

    second = make_request("second", num_prompt_tokens=40)
    scheduler.add(second)
    step = scheduler.schedule()

    # 40 tokens fill two 16-token blocks; both are shared.
    assert step.prefills == [second]
    assert second.block_table[:2] == first.block_table[:2]
    assert second.num_computed_tokens == 32
    assert second.uncomputed_token_ids() == [100] * 8


def test_last_prompt_token_is_never_taken_from_cache():
    scheduler = make_scheduler()
    first = make_request("first", num_prompt_tokens=32)
    scheduler.add(first)
    scheduler.schedule()
    scheduler.cache_prompt_blocks(first)

    second = make_request("second", num_prompt_tokens=32)
    scheduler.add(second)
    scheduler.schedule()

    assert second.num_computed_tokens == 16
    assert second.block_table[0] == first.block_table[0]
    assert second.block_table[1] != first.block_table[1]


def test_prefix_cache_can_be_disabled():
    config = BatchConfig(max_batch_size=4, max_waiting=4, max_model_len=256, enable_prefix_caching=False)
    scheduler = BatchScheduler(config, BlockPool(64, block_size=16))
    first = make_request("first", num_prompt_tokens=40)
    scheduler.add(first)
    scheduler.schedule()
    scheduler.cache_prompt_blocks(first)

    second = make_request("second", num_prompt_tokens=40)
    scheduler.add(second)
    scheduler.schedule()

    assert second.num_computed_tokens == 0
