from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_OK: _ClassVar[Status]
    STATUS_ERROR: _ClassVar[Status]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_BAD_FRAME: _ClassVar[ErrorCode]
    ERROR_CODE_TOO_LARGE: _ClassVar[ErrorCode]
    ERROR_CODE_BAD_SIGNATURE: _ClassVar[ErrorCode]
    ERROR_CODE_REPLAY: _ClassVar[ErrorCode]
    ERROR_CODE_EXPIRED: _ClassVar[ErrorCode]
    ERROR_CODE_UNKNOWN_MODEL: _ClassVar[ErrorCode]
    ERROR_CODE_SHAPE_MISMATCH: _ClassVar[ErrorCode]
    ERROR_CODE_UNSUPPORTED_PARAMS: _ClassVar[ErrorCode]
    ERROR_CODE_BUSY: _ClassVar[ErrorCode]
    ERROR_CODE_TIMEOUT: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
    ERROR_CODE_PAYMENT: _ClassVar[ErrorCode]
STATUS_UNSPECIFIED: Status
STATUS_OK: Status
STATUS_ERROR: Status
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_BAD_FRAME: ErrorCode
ERROR_CODE_TOO_LARGE: ErrorCode
ERROR_CODE_BAD_SIGNATURE: ErrorCode
ERROR_CODE_REPLAY: ErrorCode
ERROR_CODE_EXPIRED: ErrorCode
ERROR_CODE_UNKNOWN_MODEL: ErrorCode
ERROR_CODE_SHAPE_MISMATCH: ErrorCode
ERROR_CODE_UNSUPPORTED_PARAMS: ErrorCode
ERROR_CODE_BUSY: ErrorCode
ERROR_CODE_TIMEOUT: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode
ERROR_CODE_PAYMENT: ErrorCode

class Envelope(_message.Message):
    __slots__ = ("public_key", "body", "signature")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    body: bytes
    signature: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., body: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Body(_message.Message):
    __slots__ = ("request", "reply", "receipt", "advert", "trailer")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    ADVERT_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    request: MatmulRequest
    reply: MatmulReply
    receipt: SignedReceipt
    advert: CapabilityAdvert
    trailer: ReplyTrailer
    def __init__(self, request: _Optional[_Union[MatmulRequest, _Mapping]] = ..., reply: _Optional[_Union[MatmulReply, _Mapping]] = ..., receipt: _Optional[_Union[SignedReceipt, _Mapping]] = ..., advert: _Optional[_Union[CapabilityAdvert, _Mapping]] = ..., trailer: _Optional[_Union[ReplyTrailer, _Mapping]] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class WeightSlice(_message.Message):
    __slots__ = ("rows", "cols")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    rows: Range
    cols: Range
    def __init__(self, rows: _Optional[_Union[Range, _Mapping]] = ..., cols: _Optional[_Union[Range, _Mapping]] = ...) -> None: ...

class MatmulRequest(_message.Message):
    __slots__ = ("request_id", "nonce", "expires_at_ms", "model_hash", "layer", "weight_slice", "transpose", "backend", "backend_params", "mask_seeds", "input_shape", "output_shape", "payload_sha256", "payload_length", "price_per_gmac", "group")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SLICE_FIELD_NUMBER: _ClassVar[int]
    TRANSPOSE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_PARAMS_FIELD_NUMBER: _ClassVar[int]
    MASK_SEEDS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_GMAC_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    request_id: bytes
    nonce: bytes
    expires_at_ms: int
    model_hash: bytes
    layer: str
    weight_slice: WeightSlice
    transpose: bool
    backend: str
    backend_params: bytes
    mask_seeds: _containers.RepeatedScalarFieldContainer[bytes]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    payload_sha256: bytes
    payload_length: int
    price_per_gmac: int
    group: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., expires_at_ms: _Optional[int] = ..., model_hash: _Optional[bytes] = ..., layer: _Optional[str] = ..., weight_slice: _Optional[_Union[WeightSlice, _Mapping]] = ..., transpose: bool = ..., backend: _Optional[str] = ..., backend_params: _Optional[bytes] = ..., mask_seeds: _Optional[_Iterable[bytes]] = ..., input_shape: _Optional[_Iterable[int]] = ..., output_shape: _Optional[_Iterable[int]] = ..., payload_sha256: _Optional[bytes] = ..., payload_length: _Optional[int] = ..., price_per_gmac: _Optional[int] = ..., group: _Optional[_Iterable[str]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "retry_after_ms", "limit")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    retry_after_ms: int
    limit: int
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., retry_after_ms: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class MatmulReply(_message.Message):
    __slots__ = ("request_id", "request_digest", "status", "error", "payload_sha256", "payload_length", "compute_time_us", "receipt", "streamed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_LENGTH_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    STREAMED_FIELD_NUMBER: _ClassVar[int]
    request_id: bytes
    request_digest: bytes
    status: Status
    error: Error
    payload_sha256: bytes
    payload_length: int
    compute_time_us: int
    receipt: SignedReceipt
    streamed: bool
    def __init__(self, request_id: _Optional[bytes] = ..., request_digest: _Optional[bytes] = ..., status: _Optional[_Union[Status, str]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., payload_sha256: _Optional[bytes] = ..., payload_length: _Optional[int] = ..., compute_time_us: _Optional[int] = ..., receipt: _Optional[_Union[SignedReceipt, _Mapping]] = ..., streamed: bool = ...) -> None: ...

class ReplyTrailer(_message.Message):
    __slots__ = ("request_id", "request_digest", "payload_sha256", "compute_time_us", "receipt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    request_id: bytes
    request_digest: bytes
    payload_sha256: bytes
    compute_time_us: int
    receipt: SignedReceipt
    def __init__(self, request_id: _Optional[bytes] = ..., request_digest: _Optional[bytes] = ..., payload_sha256: _Optional[bytes] = ..., compute_time_us: _Optional[int] = ..., receipt: _Optional[_Union[SignedReceipt, _Mapping]] = ...) -> None: ...

class UsageReceipt(_message.Message):
    __slots__ = ("provider", "client", "request_id", "request_digest", "reply_digest", "macs", "price_per_gmac", "completed_at_ms")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REPLY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MACS_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_GMAC_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    provider: bytes
    client: bytes
    request_id: bytes
    request_digest: bytes
    reply_digest: bytes
    macs: int
    price_per_gmac: int
    completed_at_ms: int
    def __init__(self, provider: _Optional[bytes] = ..., client: _Optional[bytes] = ..., request_id: _Optional[bytes] = ..., request_digest: _Optional[bytes] = ..., reply_digest: _Optional[bytes] = ..., macs: _Optional[int] = ..., price_per_gmac: _Optional[int] = ..., completed_at_ms: _Optional[int] = ...) -> None: ...

class SignedReceipt(_message.Message):
    __slots__ = ("receipt", "provider_signature", "client_signature")
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    receipt: bytes
    provider_signature: bytes
    client_signature: bytes
    def __init__(self, receipt: _Optional[bytes] = ..., provider_signature: _Optional[bytes] = ..., client_signature: _Optional[bytes] = ...) -> None: ...

class CapabilityAdvert(_message.Message):
    __slots__ = ("protocols", "addrs", "models", "backends", "device", "macs_per_second", "price_per_gmac", "free_slots", "max_payload_size", "issued_at_ms", "expires_at_ms", "layers", "max_reply_size", "max_output_elements", "min_contraction", "max_ttl_ms", "max_unacked", "max_unacked_gmacs")
    PROTOCOLS_FIELD_NUMBER: _ClassVar[int]
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MACS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PRICE_PER_GMAC_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLY_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MIN_CONTRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_UNACKED_FIELD_NUMBER: _ClassVar[int]
    MAX_UNACKED_GMACS_FIELD_NUMBER: _ClassVar[int]
    protocols: _containers.RepeatedScalarFieldContainer[str]
    addrs: _containers.RepeatedScalarFieldContainer[bytes]
    models: _containers.RepeatedScalarFieldContainer[bytes]
    backends: _containers.RepeatedScalarFieldContainer[str]
    device: str
    macs_per_second: int
    price_per_gmac: int
    free_slots: int
    max_payload_size: int
    issued_at_ms: int
    expires_at_ms: int
    layers: _containers.RepeatedScalarFieldContainer[bytes]
    max_reply_size: int
    max_output_elements: int
    min_contraction: int
    max_ttl_ms: int
    max_unacked: int
    max_unacked_gmacs: int
    def __init__(self, protocols: _Optional[_Iterable[str]] = ..., addrs: _Optional[_Iterable[bytes]] = ..., models: _Optional[_Iterable[bytes]] = ..., backends: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., macs_per_second: _Optional[int] = ..., price_per_gmac: _Optional[int] = ..., free_slots: _Optional[int] = ..., max_payload_size: _Optional[int] = ..., issued_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., layers: _Optional[_Iterable[bytes]] = ..., max_reply_size: _Optional[int] = ..., max_output_elements: _Optional[int] = ..., min_contraction: _Optional[int] = ..., max_ttl_ms: _Optional[int] = ..., max_unacked: _Optional[int] = ..., max_unacked_gmacs: _Optional[int] = ...) -> None: ...
