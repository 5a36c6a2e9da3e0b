"""The torch sentence encoder matches sentence-transformers on the same model."""

import json
from pathlib import Path

import numpy as np

from tests.cache.support import shared_encoder

REFERENCE_PATH = Path(__file__).with_name("data") / "reference_vectors.json"


def reference() -> tuple[list[str], np.ndarray]:
    document = json.loads(REFERENCE_PATH.read_text())
    texts = [item["text"] for item in document["items"]]
    return texts, np.array([item["vector"] for item in document["items"]], dtype=np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_batched_vectors_match_reference() -> None:
    texts, expected = reference()

    vectors = shared_encoder().encode(texts)

    assert vectors.shape == expected.shape
    assert np.all(cosines(vectors, expected) >= 1 - 1e-4), cosines(vectors, expected)


def test_single_vectors_match_reference() -> None:
    texts, expected = reference()

    vectors = np.stack([shared_encoder().encode([text])[0] for text in texts])

    assert np.all(cosines(vectors, expected) >= 1 - 1e-4), cosines(vectors, expected)


def test_vectors_are_unit_length() -> None:
    texts, _ = reference()

    norms = np.linalg.norm(shared_encoder().encode(texts), axis=1)

    assert np.allclose(norms, 1.0, atol=1e-5)


def test_token_count_includes_markers_and_ignores_truncation() -> None:
    encoder = shared_encoder()

    counts = encoder.count_tokens(["a", " ".join(["token"] * 300)])

    assert counts == [3, 302]
    assert encoder.max_tokens == 256
