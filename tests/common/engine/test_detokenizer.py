import pytest

from services.common.engine.detokenizer import IncrementalDetokenizer

from .support import model_tokenizer


def stream_tokens(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    """Feed ``token_ids`` one at a time and return every delta, empty ones included."""
    return [detokenizer.add([token_id]) for token_id in token_ids]


@pytest.mark.parametrize("text", ["Tokyo 東京 and Kraków 🎉🇫🇷 done", "日本語のテキスト", "emoji: 👩‍👩‍👧‍👦"])
def test_multibyte_characters_are_never_split(text):
    tokenizer = model_tokenizer()
    token_ids = tokenizer.encode(text)
    # The case only tests something if some token is not valid UTF-8 by itself.
    assert any(tokenizer.decode([token_id]).count("\ufffd") for token_id in token_ids)

    deltas = stream_tokens(IncrementalDetokenizer(tokenizer.token_bytes), token_ids)

    assert "".join(deltas) == text
    for delta in deltas:
        assert "\ufffd" not in delta


def test_stop_string_is_never_streamed():
    tokenizer = model_tokenizer()
    text = "The capital of France is Paris. It is large."
    detokenizer = IncrementalDetokenizer(tokenizer.token_bytes, stop=["Paris."])

    deltas = stream_tokens(detokenizer, tokenizer.encode(text))

    assert detokenizer.stop_found == "Paris."
    assert "".join(deltas) == "The capital of France is "


def test_partial_stop_string_is_released_when_it_diverges():
    tokenizer = model_tokenizer()
    text = "Paris is nice. Paris."
    detokenizer = IncrementalDetokenizer(tokenizer.token_bytes, stop=["Paris."])
    streamed = ""

    for token_id in tokenizer.encode(text):
        streamed += detokenizer.add([token_id])
        # No streamed prefix may end with a start of the stop string.
        assert not any(streamed.endswith("Paris."[:n]) for n in range(1, 7))

    assert streamed == "Paris is nice. "
    assert detokenizer.stop_found == "Paris."


def test_held_back_text_is_flushed_at_the_end():
    tokenizer = model_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer.token_bytes, stop=["STOP HERE"])

    streamed = "".join(stream_tokens(detokenizer, tokenizer.encode("almost STOP")))

    assert streamed == "almost "
    assert detokenizer.flush() == "STOP"
    assert detokenizer.stop_found is None


def test_earliest_of_several_stop_strings_wins():
    tokenizer = model_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer.token_bytes, stop=["c d", "b"])

    streamed = "".join(stream_tokens(detokenizer, tokenizer.encode("a b c d")))

    assert streamed == "a "
    assert detokenizer.stop_found == "b"


def test_stop_string_inside_one_token():
    tokenizer = model_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer.token_bytes, stop=["ell"])

    streamed = "".join(stream_tokens(detokenizer, tokenizer.encode("say hello world")))

    assert streamed == "say h"


def test_incomplete_character_is_dropped_at_flush():
    tokenizer = model_tokenizer()
    token_ids = tokenizer.encode("🎉")
    detokenizer = IncrementalDetokenizer(tokenizer.token_bytes)

    streamed = "".join(stream_tokens(detokenizer, token_ids[:-1]))

    assert streamed == ""
    assert detokenizer.flush() == ""


def test_control_tokens_decode_to_nothing():
    tokenizer = model_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer.token_bytes)

    assert detokenizer.add([tokenizer.eos_token_id]) == ""
