from tensortrace.v1 import records_pb2 as _records_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupRequest(_message.Message):
    __slots__ = ("trace_id", "request_id")
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    trace_id: bytes
    request_id: str
    def __init__(self, trace_id: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class RequestRef(_message.Message):
    __slots__ = ("trace_id", "request_id", "model", "first_capture_unix_nano", "last_capture_unix_nano")
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FIRST_CAPTURE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LAST_CAPTURE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    trace_id: bytes
    request_id: str
    model: str
    first_capture_unix_nano: int
    last_capture_unix_nano: int
    def __init__(self, trace_id: _Optional[bytes] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., first_capture_unix_nano: _Optional[int] = ..., last_capture_unix_nano: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestRef]
    def __init__(self, requests: _Optional[_Iterable[_Union[RequestRef, _Mapping]]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("request", "summaries", "records_loaded")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    RECORDS_LOADED_FIELD_NUMBER: _ClassVar[int]
    request: RequestRef
    summaries: _containers.RepeatedCompositeFieldContainer[_records_pb2.RequestSummary]
    records_loaded: int
    def __init__(self, request: _Optional[_Union[RequestRef, _Mapping]] = ..., summaries: _Optional[_Iterable[_Union[_records_pb2.RequestSummary, _Mapping]]] = ..., records_loaded: _Optional[int] = ...) -> None: ...

class HookLayerStats(_message.Message):
    __slots__ = ("hook", "layer", "records", "token_start", "token_end", "tokens", "raw_bytes", "stored_bytes", "capture_to_export_ms_p50", "export_to_load_ms_p50", "capture_to_load_ms_max")
    HOOK_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TO_EXPORT_MS_P50_FIELD_NUMBER: _ClassVar[int]
    EXPORT_TO_LOAD_MS_P50_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TO_LOAD_MS_MAX_FIELD_NUMBER: _ClassVar[int]
    hook: str
    layer: int
    records: int
    token_start: int
    token_end: int
    tokens: int
    raw_bytes: int
    stored_bytes: int
    capture_to_export_ms_p50: float
    export_to_load_ms_p50: float
    capture_to_load_ms_max: float
    def __init__(self, hook: _Optional[str] = ..., layer: _Optional[int] = ..., records: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., tokens: _Optional[int] = ..., raw_bytes: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., capture_to_export_ms_p50: _Optional[float] = ..., export_to_load_ms_p50: _Optional[float] = ..., capture_to_load_ms_max: _Optional[float] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("hooks",)
    HOOKS_FIELD_NUMBER: _ClassVar[int]
    hooks: _containers.RepeatedCompositeFieldContainer[HookLayerStats]
    def __init__(self, hooks: _Optional[_Iterable[_Union[HookLayerStats, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("request", "hooks", "layers", "assembled")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    HOOKS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    ASSEMBLED_FIELD_NUMBER: _ClassVar[int]
    request: RequestRef
    hooks: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedScalarFieldContainer[int]
    assembled: bool
    def __init__(self, request: _Optional[_Union[RequestRef, _Mapping]] = ..., hooks: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[int]] = ..., assembled: _Optional[bool] = ...) -> None: ...

class AssembledTensor(_message.Message):
    __slots__ = ("hook", "layer", "dtype", "shape", "start", "end", "gap_starts", "gap_ends", "positions", "records", "prefill_rows", "decode_rows", "data")
    HOOK_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    GAP_STARTS_FIELD_NUMBER: _ClassVar[int]
    GAP_ENDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ROWS_FIELD_NUMBER: _ClassVar[int]
    DECODE_ROWS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    hook: str
    layer: int
    dtype: _records_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    start: int
    end: int
    gap_starts: _containers.RepeatedScalarFieldContainer[int]
    gap_ends: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    records: int
    prefill_rows: int
    decode_rows: int
    data: bytes
    def __init__(self, hook: _Optional[str] = ..., layer: _Optional[int] = ..., dtype: _Optional[_Union[_records_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., gap_starts: _Optional[_Iterable[int]] = ..., gap_ends: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ..., records: _Optional[int] = ..., prefill_rows: _Optional[int] = ..., decode_rows: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("total_records", "record", "records", "tensor")
    TOTAL_RECORDS_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    total_records: int
    record: _records_pb2.TensorRecord
    records: RecordBatch
    tensor: AssembledTensor
    def __init__(self, total_records: _Optional[int] = ..., record: _Optional[_Union[_records_pb2.TensorRecord, _Mapping]] = ..., records: _Optional[_Union[RecordBatch, _Mapping]] = ..., tensor: _Optional[_Union[AssembledTensor, _Mapping]] = ...) -> None: ...

class RecordBatch(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_records_pb2.TensorRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[_records_pb2.TensorRecord, _Mapping]]] = ...) -> None: ...
