"""Checks of the cache service's requests; each error names the field and the limit."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from services.common.errors import InvalidArgument
from tenantserve.v1 import inference_pb2

MAX_DOCUMENT_ID_CHARS = 256
MAX_METADATA_ENTRIES = 16
MAX_METADATA_CHARS = 256

CountTokensFn = Callable[[list[str]], list[int]]


def check_texts(field: str, texts: Sequence[str], max_texts: int, max_tokens: int, count_tokens: CountTokensFn) -> int:
    """Check a list of texts and return their total number of tokens.

    ``field`` names the list in messages, for example ``texts`` or
    ``documents[].text``, where ``[]`` takes the index of the bad text.
    """
    list_field = field.split("[]")[0]
    if not texts:
        raise InvalidArgument(list_field, "must contain at least one item")
    if len(texts) > max_texts:
        raise InvalidArgument(list_field, f"must contain at most {max_texts} items, got {len(texts)}")
    for index, text in enumerate(texts):
        if not text:
            raise InvalidArgument(_item_field(field, index), "must not be empty")
    token_counts = count_tokens(list(texts))
    for index, num_tokens in enumerate(token_counts):
        if num_tokens > max_tokens:
            raise InvalidArgument(
                _item_field(field, index),
                f"has {num_tokens} tokens, more than the embedding model's maximum of {max_tokens} "
                "([CLS] and [SEP] included); split the text",
            )
    return sum(token_counts)


def check_text(field: str, text: str, max_tokens: int, count_tokens: CountTokensFn) -> int:
    """Check one text and return its number of tokens."""
    if not text:
        raise InvalidArgument(field, "must not be empty")
    (num_tokens,) = count_tokens([text])
    if num_tokens > max_tokens:
        raise InvalidArgument(
            field,
            f"has {num_tokens} tokens, more than the embedding model's maximum of {max_tokens} "
            "([CLS] and [SEP] included); shorten the text",
        )
    return num_tokens


def check_documents(documents: Sequence[inference_pb2.Document]) -> None:
    """Check the ids and metadata of an upsert; the texts go through check_texts."""
    seen: set[str] = set()
    for index, document in enumerate(documents):
        field = f"documents[{index}]"
        check_document_id(f"{field}.id", document.id)
        if document.id in seen:
            raise InvalidArgument(f"{field}.id", f"repeats id {document.id!r}; each id may appear once per call")
        seen.add(document.id)
        check_metadata(f"{field}.metadata", document.metadata)


def check_document_id(field: str, document_id: str) -> None:
    if not document_id:
        raise InvalidArgument(field, "must not be empty")
    if len(document_id) > MAX_DOCUMENT_ID_CHARS:
        raise InvalidArgument(field, f"must be at most {MAX_DOCUMENT_ID_CHARS} characters, got {len(document_id)}")


def check_metadata(field: str, metadata: Mapping[str, str]) -> None:
    if len(metadata) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(field, f"must have at most {MAX_METADATA_ENTRIES} entries, got {len(metadata)}")
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_CHARS or len(value) > MAX_METADATA_CHARS:
            raise InvalidArgument(
                f"{field}[{key!r}]", f"key must be 1 to {MAX_METADATA_CHARS} characters and value at most {MAX_METADATA_CHARS}"
            )


def check_delete_ids(ids: Sequence[str], max_ids: int) -> None:
    if not ids:
        raise InvalidArgument("ids", "must contain at least one id")
    if len(ids) > max_ids:
        raise InvalidArgument("ids", f"must contain at most {max_ids} ids, got {len(ids)}")
    for index, document_id in enumerate(ids):
        check_document_id(f"ids[{index}]", document_id)


def check_k(k: int, max_k: int) -> None:
    if not 1 <= k <= max_k:
        raise InvalidArgument("k", f"must be between 1 and {max_k}, got {k}")


def _item_field(field: str, index: int) -> str:
    if "[]" in field:
        return field.replace("[]", f"[{index}]", 1)
    return f"{field}[{index}]"
