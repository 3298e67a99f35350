from tensortrace.v1 import records_pb2 as _records_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestRows(_message.Message):
    __slots__ = ("request_id", "trace_id", "span_id", "row_start", "row_count", "position_start", "phase")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    POSITION_START_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trace_id: bytes
    span_id: bytes
    row_start: int
    row_count: int
    position_start: int
    phase: _records_pb2.Phase
    def __init__(self, request_id: _Optional[str] = ..., trace_id: _Optional[bytes] = ..., span_id: _Optional[bytes] = ..., row_start: _Optional[int] = ..., row_count: _Optional[int] = ..., position_start: _Optional[int] = ..., phase: _Optional[_Union[_records_pb2.Phase, str]] = ...) -> None: ...

class RingStep(_message.Message):
    __slots__ = ("step", "model_id", "requests", "capture_time_unix_nano", "tp_size")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    step: int
    model_id: str
    requests: _containers.RepeatedCompositeFieldContainer[RequestRows]
    capture_time_unix_nano: int
    tp_size: int
    def __init__(self, step: _Optional[int] = ..., model_id: _Optional[str] = ..., requests: _Optional[_Iterable[_Union[RequestRows, _Mapping]]] = ..., capture_time_unix_nano: _Optional[int] = ..., tp_size: _Optional[int] = ...) -> None: ...

class SlabPart(_message.Message):
    __slots__ = ("request_index", "slab_row_start", "row_count", "position_start")
    REQUEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    SLAB_ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    POSITION_START_FIELD_NUMBER: _ClassVar[int]
    request_index: int
    slab_row_start: int
    row_count: int
    position_start: int
    def __init__(self, request_index: _Optional[int] = ..., slab_row_start: _Optional[int] = ..., row_count: _Optional[int] = ..., position_start: _Optional[int] = ...) -> None: ...

class RingSlab(_message.Message):
    __slots__ = ("step", "hook", "layer", "tp_rank", "tp_size", "dtype", "row_shape", "parts", "capture_time_unix_nano")
    STEP_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROW_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    step: int
    hook: str
    layer: int
    tp_rank: int
    tp_size: int
    dtype: _records_pb2.DType
    row_shape: _containers.RepeatedScalarFieldContainer[int]
    parts: _containers.RepeatedCompositeFieldContainer[SlabPart]
    capture_time_unix_nano: int
    def __init__(self, step: _Optional[int] = ..., hook: _Optional[str] = ..., layer: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., dtype: _Optional[_Union[_records_pb2.DType, str]] = ..., row_shape: _Optional[_Iterable[int]] = ..., parts: _Optional[_Iterable[_Union[SlabPart, _Mapping]]] = ..., capture_time_unix_nano: _Optional[int] = ...) -> None: ...
