from tenantserve.v1 import common_pb2 as _common_pb2
from tenantserve.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheEmbedRequest(_message.Message):
    __slots__ = ("tenant_id", "request")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request: _inference_pb2.EmbedRequest
    def __init__(self, tenant_id: _Optional[str] = ..., request: _Optional[_Union[_inference_pb2.EmbedRequest, _Mapping]] = ...) -> None: ...

class CacheUpsertDocumentsRequest(_message.Message):
    __slots__ = ("tenant_id", "request")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request: _inference_pb2.UpsertDocumentsRequest
    def __init__(self, tenant_id: _Optional[str] = ..., request: _Optional[_Union[_inference_pb2.UpsertDocumentsRequest, _Mapping]] = ...) -> None: ...

class CacheSearchRequest(_message.Message):
    __slots__ = ("tenant_id", "request")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request: _inference_pb2.SearchRequest
    def __init__(self, tenant_id: _Optional[str] = ..., request: _Optional[_Union[_inference_pb2.SearchRequest, _Mapping]] = ...) -> None: ...

class CacheDeleteDocumentsRequest(_message.Message):
    __slots__ = ("tenant_id", "request")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request: _inference_pb2.DeleteDocumentsRequest
    def __init__(self, tenant_id: _Optional[str] = ..., request: _Optional[_Union[_inference_pb2.DeleteDocumentsRequest, _Mapping]] = ...) -> None: ...

class CachedCompletion(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "completion_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    completion_tokens: int
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class LookupCompletionRequest(_message.Message):
    __slots__ = ("tenant_id", "key")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    key: str
    def __init__(self, tenant_id: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class LookupCompletionResponse(_message.Message):
    __slots__ = ("found", "completion")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    found: bool
    completion: CachedCompletion
    def __init__(self, found: _Optional[bool] = ..., completion: _Optional[_Union[CachedCompletion, _Mapping]] = ...) -> None: ...

class StoreCompletionRequest(_message.Message):
    __slots__ = ("tenant_id", "key", "completion")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    key: str
    completion: CachedCompletion
    def __init__(self, tenant_id: _Optional[str] = ..., key: _Optional[str] = ..., completion: _Optional[_Union[CachedCompletion, _Mapping]] = ...) -> None: ...

class StoreCompletionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
