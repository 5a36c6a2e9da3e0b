"""The inference engine with the real PyTorch runner: batching, sampling, stop strings, aborts."""

import asyncio

import pytest

from services.common.engine import (
    EngineStoppedError,
    FinishReason,
    InvalidRequestError,
    SamplingParams,
    WaitingQueueFullError,
)

from .support import FRANCE_QUESTION, STORY_REQUEST, StepRecorder, chat_ids, collect, start_engine, text_of, wait_until


def test_greedy_answer_names_paris():
    async def scenario():
        engine = start_engine()
        try:
            return await collect(engine, "france", chat_ids(FRANCE_QUESTION), SamplingParams(max_tokens=16))
        finally:
            engine.stop()

    outputs = asyncio.run(scenario())

    assert "Paris" in text_of(outputs)
    assert outputs[-1].finish_reason is FinishReason.STOP
    assert outputs[-1].num_prompt_tokens == len(chat_ids(FRANCE_QUESTION))
    assert outputs[-1].num_completion_tokens == sum(len(output.token_ids) for output in outputs)


def test_concurrent_requests_share_decode_steps():
    recorder = StepRecorder()
    questions = [FRANCE_QUESTION, "Name three colors.", "What is 2 + 2?"]

    async def scenario():
        engine = start_engine(recorder)
        try:
            return await asyncio.gather(
                *(collect(engine, f"r{i}", chat_ids(q), SamplingParams(max_tokens=8)) for i, q in enumerate(questions))
            )
        finally:
            engine.stop()

    results = asyncio.run(scenario())

    assert max(step.num_decodes for step in recorder.steps) == len(questions)
    for outputs in results:
        assert outputs[-1].finished


def test_request_joins_while_another_decodes():
    recorder = StepRecorder()

    async def scenario():
        engine = start_engine(recorder)
        try:
            first = engine.add_request("first", "alpha", chat_ids(STORY_REQUEST), SamplingParams(max_tokens=24))
            first_outputs = [await anext(first)]
            second = await collect(engine, "second", chat_ids(FRANCE_QUESTION), SamplingParams(max_tokens=4))
            # The second request finished while the first was still decoding.
            first_outputs += [output async for output in first]
            return first_outputs, second
        finally:
            engine.stop()

    first_outputs, second_outputs = asyncio.run(scenario())

    assert first_outputs[-1].finish_reason is FinishReason.LENGTH
    assert first_outputs[-1].num_completion_tokens == 24
    assert second_outputs[-1].num_completion_tokens == 4
    joined = [step for step in recorder.steps if step.num_prefills == 1 and step.num_decodes == 1]
    assert len(joined) == 1


def test_same_seed_gives_same_sample():
    async def scenario():
        engine = start_engine()
        prompt = chat_ids("Write a poem about the sea.")
        try:
            texts = []
            for request_id, seed in (("a", 7), ("b", 7), ("c", 8), ("d", 9)):
                sampling = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=seed)
                texts.append(text_of(await collect(engine, request_id, prompt, sampling)))
            return texts
        finally:
            engine.stop()

    first, repeat, *others = asyncio.run(scenario())

    assert first == repeat
    assert len({first, *others}) > 1


def test_stop_string_never_reaches_a_delta():
    async def scenario():
        engine = start_engine()
        try:
            sampling = SamplingParams(max_tokens=16, stop=("Paris",))
            return await collect(engine, "stop", chat_ids(FRANCE_QUESTION), sampling)
        finally:
            engine.stop()

    outputs = asyncio.run(scenario())

    assert outputs[-1].finish_reason is FinishReason.STOP_STRING
    assert text_of(outputs) == "The capital of France is "
    for output in outputs:
        assert "P" not in output.text


def test_abort_frees_blocks_within_one_step():
    recorder = StepRecorder()

    async def scenario():
        engine = start_engine(recorder)
        try:
            total_blocks = engine.stats().num_total_kv_blocks
            other = asyncio.create_task(
                collect(engine, "other", chat_ids(STORY_REQUEST), SamplingParams(max_tokens=20))
            )
            stream = engine.add_request("aborted", "alpha", chat_ids(STORY_REQUEST), SamplingParams(max_tokens=200))
            await anext(stream)
            # Both must run before the abort, or num_running == 1 below would
            # hold before the abort takes effect.
            await wait_until(lambda: engine.stats().num_running == 2)
            blocks_in_use = total_blocks - engine.stats().num_free_kv_blocks

            steps_at_abort = recorder.num_steps
            stream.close()
            await wait_until(lambda: engine.stats().num_running == 1)
            steps_to_free = recorder.num_steps - steps_at_abort
            blocks_after_abort = total_blocks - engine.stats().num_free_kv_blocks

            other_outputs = await other
            return blocks_in_use, blocks_after_abort, steps_to_free, other_outputs, engine.stats()
        finally:
            engine.stop()

    blocks_in_use, blocks_after_abort, steps_to_free, other_outputs, final = asyncio.run(scenario())

    assert steps_to_free <= 1
    assert blocks_after_abort < blocks_in_use
    assert [r.finish_reason for r in recorder.finished if r.request_id == "aborted"] == [FinishReason.CANCELLED]
    assert other_outputs[-1].finish_reason is FinishReason.LENGTH
    assert final.num_free_kv_blocks == final.num_total_kv_blocks


def test_prompt_prefix_is_reused_within_tenant():
    recorder = StepRecorder()
    prompt = chat_ids(FRANCE_QUESTION)

    async def scenario():
        engine = start_engine(recorder)
        try:
            texts = []
            for request_id, tenant_id in (("first", "alpha"), ("again", "alpha"), ("other", "beta")):
                stream = engine.add_request(request_id, tenant_id, prompt, SamplingParams(max_tokens=8))
                texts.append(text_of([output async for output in stream]))
            return texts
        finally:
            engine.stop()

    texts = asyncio.run(scenario())

    cached = [step.num_cached_prompt_tokens for step in recorder.steps if step.num_prefills]
    assert cached == [0, (len(prompt) - 1) // 16 * 16, 0]
    assert texts[1] == texts[0]
    assert texts[2] == texts[0]


def test_waiting_queue_full_is_rejected():
    async def scenario():
        engine = start_engine(max_batch_size=1, max_waiting=1)
        try:
            running = engine.add_request("running", "alpha", chat_ids(STORY_REQUEST), SamplingParams(max_tokens=40))
            await anext(running)
            waiting = engine.add_request("waiting", "alpha", chat_ids(FRANCE_QUESTION), SamplingParams(max_tokens=2))
            with pytest.raises(WaitingQueueFullError):
                engine.add_request("rejected", "alpha", chat_ids(FRANCE_QUESTION), SamplingParams(max_tokens=2))
            running.close()
            return [output async for output in waiting]
        finally:
            engine.stop()

    waiting_outputs = asyncio.run(scenario())

    assert waiting_outputs[-1].finished


def test_context_length_ends_the_completion():
    prompt = chat_ids(FRANCE_QUESTION)

    async def scenario():
        engine = start_engine(max_context_tokens=len(prompt) + 3)
        try:
            return await collect(engine, "short", prompt, SamplingParams(max_tokens=50))
        finally:
            engine.stop()

    outputs = asyncio.run(scenario())

    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert outputs[-1].num_completion_tokens == 3


@pytest.mark.parametrize(
    ("prompt", "sampling", "field"),
    [
        ([], SamplingParams(max_tokens=4), "prompt_token_ids"),
        ([1] * 5000, SamplingParams(max_tokens=4), "prompt_token_ids"),
        ([1, 49152], SamplingParams(max_tokens=4), "prompt_token_ids"),
        ([1, 2, 3], SamplingParams(max_tokens=0), "sampling"),
        ([1, 2, 3], SamplingParams(max_tokens=4, top_p=0.0), "sampling"),
        ([1, 2, 3], SamplingParams(max_tokens=4, stop=("",)), "sampling"),
    ],
)
def test_invalid_requests_are_rejected(prompt, sampling, field):
    async def scenario():
        engine = start_engine()
        try:
            with pytest.raises(InvalidRequestError) as raised:
                engine.add_request("invalid", "alpha", prompt, sampling)
            return raised.value
        finally:
            engine.stop()

    assert asyncio.run(scenario()).field == field


def test_duplicate_request_id_is_rejected():
    async def scenario():
        engine = start_engine()
        try:
            stream = engine.add_request("same", "alpha", chat_ids(FRANCE_QUESTION), SamplingParams(max_tokens=4))
            with pytest.raises(InvalidRequestError):
                engine.add_request("same", "alpha", chat_ids(FRANCE_QUESTION), SamplingParams(max_tokens=4))
            return [output async for output in stream]
        finally:
            engine.stop()

    assert asyncio.run(scenario())[-1].finished


def test_stop_fails_running_requests_as_retryable():
    async def scenario():
        engine = start_engine()
        stream = engine.add_request("running", "alpha", chat_ids(STORY_REQUEST), SamplingParams(max_tokens=200))
        await anext(stream)
        await asyncio.to_thread(engine.stop)
        with pytest.raises(EngineStoppedError):
            async for _ in stream:
                pass
        with pytest.raises(EngineStoppedError):
            engine.add_request("late", "alpha", chat_ids(FRANCE_QUESTION), SamplingParams(max_tokens=2))

    asyncio.run(scenario())
