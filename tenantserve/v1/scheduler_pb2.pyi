from tenantserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AcceleratorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCELERATOR_KIND_UNSPECIFIED: _ClassVar[AcceleratorKind]
    ACCELERATOR_KIND_CPU: _ClassVar[AcceleratorKind]
    ACCELERATOR_KIND_CUDA: _ClassVar[AcceleratorKind]
    ACCELERATOR_KIND_TPU: _ClassVar[AcceleratorKind]
ACCELERATOR_KIND_UNSPECIFIED: AcceleratorKind
ACCELERATOR_KIND_CPU: AcceleratorKind
ACCELERATOR_KIND_CUDA: AcceleratorKind
ACCELERATOR_KIND_TPU: AcceleratorKind

class ScheduleRequest(_message.Message):
    __slots__ = ("tenant_id", "request_id", "model", "prompt_token_ids", "sampling", "service_class")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SERVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    service_class: _common_pb2.ServiceClass
    def __init__(self, tenant_id: _Optional[str] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., service_class: _Optional[_Union[_common_pb2.ServiceClass, str]] = ...) -> None: ...

class WorkerReport(_message.Message):
    __slots__ = ("worker_id", "address", "models", "accelerator", "max_batch_size", "num_free_kv_blocks", "num_total_kv_blocks", "kv_block_size", "num_running", "num_waiting")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    models: _containers.RepeatedScalarFieldContainer[str]
    accelerator: AcceleratorKind
    max_batch_size: int
    num_free_kv_blocks: int
    num_total_kv_blocks: int
    kv_block_size: int
    num_running: int
    num_waiting: int
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., accelerator: _Optional[_Union[AcceleratorKind, str]] = ..., max_batch_size: _Optional[int] = ..., num_free_kv_blocks: _Optional[int] = ..., num_total_kv_blocks: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("heartbeat_timeout_seconds",)
    HEARTBEAT_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_timeout_seconds: float
    def __init__(self, heartbeat_timeout_seconds: _Optional[float] = ...) -> None: ...
