from google.protobuf import field_mask_pb2 as _field_mask_pb2
from tenantserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServiceClassOverride(_message.Message):
    __slots__ = ("service_class", "limits")
    class LimitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SERVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    service_class: _common_pb2.ServiceClass
    limits: _containers.ScalarMap[str, int]
    def __init__(self, service_class: _Optional[_Union[_common_pb2.ServiceClass, str]] = ..., limits: _Optional[_Mapping[str, int]] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("name", "weight", "requests_per_minute", "tokens_per_minute", "max_concurrent_streams", "daily_token_budget", "monthly_token_budget", "max_prompt_tokens", "max_tokens", "allowed_models", "allowed_service_classes", "service_class_overrides", "disabled", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    DAILY_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_SERVICE_CLASSES_FIELD_NUMBER: _ClassVar[int]
    SERVICE_CLASS_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent_streams: int
    daily_token_budget: int
    monthly_token_budget: int
    max_prompt_tokens: int
    max_tokens: int
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    allowed_service_classes: _containers.RepeatedScalarFieldContainer[_common_pb2.ServiceClass]
    service_class_overrides: _containers.RepeatedCompositeFieldContainer[ServiceClassOverride]
    disabled: bool
    version: int
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., max_concurrent_streams: _Optional[int] = ..., daily_token_budget: _Optional[int] = ..., monthly_token_budget: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., allowed_models: _Optional[_Iterable[str]] = ..., allowed_service_classes: _Optional[_Iterable[_Union[_common_pb2.ServiceClass, str]]] = ..., service_class_overrides: _Optional[_Iterable[_Union[ServiceClassOverride, _Mapping]]] = ..., disabled: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class UpdateTenantRequest(_message.Message):
    __slots__ = ("tenant", "update_mask")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class DisableTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class EnableTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ...) -> None: ...

class IssueCertificateRequest(_message.Message):
    __slots__ = ("tenant_id", "valid_days")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    VALID_DAYS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    valid_days: int
    def __init__(self, tenant_id: _Optional[str] = ..., valid_days: _Optional[int] = ...) -> None: ...

class IssueCertificateResponse(_message.Message):
    __slots__ = ("certificate_pem", "private_key_pem", "fingerprint_sha256")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: str
    private_key_pem: str
    fingerprint_sha256: str
    def __init__(self, certificate_pem: _Optional[str] = ..., private_key_pem: _Optional[str] = ..., fingerprint_sha256: _Optional[str] = ...) -> None: ...

class RevokeCertificateRequest(_message.Message):
    __slots__ = ("fingerprint_sha256",)
    FINGERPRINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    fingerprint_sha256: str
    def __init__(self, fingerprint_sha256: _Optional[str] = ...) -> None: ...

class RevokeCertificateResponse(_message.Message):
    __slots__ = ("fingerprint_sha256", "already_revoked")
    FINGERPRINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    ALREADY_REVOKED_FIELD_NUMBER: _ClassVar[int]
    fingerprint_sha256: str
    already_revoked: bool
    def __init__(self, fingerprint_sha256: _Optional[str] = ..., already_revoked: _Optional[bool] = ...) -> None: ...
