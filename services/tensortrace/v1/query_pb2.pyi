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

class TraceRequest(_message.Message):
    __slots__ = ("trace_id", "request_id", "residual_norms")
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_NORMS_FIELD_NUMBER: _ClassVar[int]
    trace_id: bytes
    request_id: str
    residual_norms: bool
    def __init__(self, trace_id: _Optional[bytes] = ..., request_id: _Optional[str] = ..., residual_norms: _Optional[bool] = ...) -> None: ...

class TraceSpan(_message.Message):
    __slots__ = ("span_id", "parent_span_id", "name", "kind", "service", "start_unix_nano", "duration_nano", "status", "status_message", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    DURATION_NANO_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    service: str
    start_unix_nano: int
    duration_nano: int
    status: str
    status_message: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, span_id: _Optional[str] = ..., parent_span_id: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., service: _Optional[str] = ..., start_unix_nano: _Optional[int] = ..., duration_nano: _Optional[int] = ..., status: _Optional[str] = ..., status_message: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TraceStepTimes(_message.Message):
    __slots__ = ("step", "phase", "first_capture_unix_nano", "last_capture_unix_nano", "last_export_unix_nano", "last_load_unix_nano")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FIRST_CAPTURE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LAST_CAPTURE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LAST_EXPORT_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    LAST_LOAD_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    step: int
    phase: str
    first_capture_unix_nano: int
    last_capture_unix_nano: int
    last_export_unix_nano: int
    last_load_unix_nano: int
    def __init__(self, step: _Optional[int] = ..., phase: _Optional[str] = ..., first_capture_unix_nano: _Optional[int] = ..., last_capture_unix_nano: _Optional[int] = ..., last_export_unix_nano: _Optional[int] = ..., last_load_unix_nano: _Optional[int] = ...) -> None: ...

class TraceTiming(_message.Message):
    __slots__ = ("steps", "summary_start_unix_nano", "summary_end_unix_nano", "summary_export_unix_nano", "summary_load_unix_nano", "producer_node", "producer_pod")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_START_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_END_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_EXPORT_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_LOAD_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_NODE_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_POD_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[TraceStepTimes]
    summary_start_unix_nano: int
    summary_end_unix_nano: int
    summary_export_unix_nano: int
    summary_load_unix_nano: int
    producer_node: str
    producer_pod: str
    def __init__(self, steps: _Optional[_Iterable[_Union[TraceStepTimes, _Mapping]]] = ..., summary_start_unix_nano: _Optional[int] = ..., summary_end_unix_nano: _Optional[int] = ..., summary_export_unix_nano: _Optional[int] = ..., summary_load_unix_nano: _Optional[int] = ..., producer_node: _Optional[str] = ..., producer_pod: _Optional[str] = ...) -> None: ...

class ProbeVerdict(_message.Message):
    __slots__ = ("probe", "name", "probe_hash", "score", "threshold", "label", "complete", "incomplete_reason", "hook", "layers", "pooling", "tokens_scored", "request_end_unix_nano", "scored_unix_nano", "request_id")
    PROBE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROBE_HASH_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    INCOMPLETE_REASON_FIELD_NUMBER: _ClassVar[int]
    HOOK_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SCORED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_END_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    SCORED_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    probe: str
    name: str
    probe_hash: str
    score: float
    threshold: float
    label: str
    complete: bool
    incomplete_reason: str
    hook: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    pooling: str
    tokens_scored: int
    request_end_unix_nano: int
    scored_unix_nano: int
    request_id: str
    def __init__(self, probe: _Optional[str] = ..., name: _Optional[str] = ..., probe_hash: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., label: _Optional[str] = ..., complete: _Optional[bool] = ..., incomplete_reason: _Optional[str] = ..., hook: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., pooling: _Optional[str] = ..., tokens_scored: _Optional[int] = ..., request_end_unix_nano: _Optional[int] = ..., scored_unix_nano: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ProbeCurve(_message.Message):
    __slots__ = ("name", "positions", "scores")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    name: str
    positions: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., positions: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ResidualNorms(_message.Message):
    __slots__ = ("hook", "layers", "start", "shape", "norms", "positions_total")
    HOOK_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NORMS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    hook: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    start: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    norms: bytes
    positions_total: int
    def __init__(self, hook: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., start: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., norms: _Optional[bytes] = ..., positions_total: _Optional[int] = ...) -> None: ...

class TraceResponse(_message.Message):
    __slots__ = ("trace_id", "request_id", "model", "request_ids", "request", "spans", "spans_truncated", "timing", "summaries", "records_loaded", "stats", "probe_curves", "probe_verdicts", "where", "notes", "residual_norms")
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    SPANS_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    RECORDS_LOADED_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    PROBE_CURVES_FIELD_NUMBER: _ClassVar[int]
    PROBE_VERDICTS_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_NORMS_FIELD_NUMBER: _ClassVar[int]
    trace_id: str
    request_id: str
    model: str
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    request: RequestRef
    spans: _containers.RepeatedCompositeFieldContainer[TraceSpan]
    spans_truncated: bool
    timing: TraceTiming
    summaries: _containers.RepeatedCompositeFieldContainer[_records_pb2.RequestSummary]
    records_loaded: int
    stats: _containers.RepeatedCompositeFieldContainer[HookLayerStats]
    probe_curves: _containers.RepeatedCompositeFieldContainer[ProbeCurve]
    probe_verdicts: _containers.RepeatedCompositeFieldContainer[ProbeVerdict]
    where: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    residual_norms: ResidualNorms
    def __init__(self, trace_id: _Optional[str] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., request_ids: _Optional[_Iterable[str]] = ..., request: _Optional[_Union[RequestRef, _Mapping]] = ..., spans: _Optional[_Iterable[_Union[TraceSpan, _Mapping]]] = ..., spans_truncated: _Optional[bool] = ..., timing: _Optional[_Union[TraceTiming, _Mapping]] = ..., summaries: _Optional[_Iterable[_Union[_records_pb2.RequestSummary, _Mapping]]] = ..., records_loaded: _Optional[int] = ..., stats: _Optional[_Iterable[_Union[HookLayerStats, _Mapping]]] = ..., probe_curves: _Optional[_Iterable[_Union[ProbeCurve, _Mapping]]] = ..., probe_verdicts: _Optional[_Iterable[_Union[ProbeVerdict, _Mapping]]] = ..., where: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., residual_norms: _Optional[_Union[ResidualNorms, _Mapping]] = ...) -> None: ...

class SlowestTracesRequest(_message.Message):
    __slots__ = ("limit", "since_unix_nano")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    limit: int
    since_unix_nano: int
    def __init__(self, limit: _Optional[int] = ..., since_unix_nano: _Optional[int] = ...) -> None: ...

class SlowTrace(_message.Message):
    __slots__ = ("trace_id", "request_id", "start_unix_nano", "duration_ms", "prompt_tokens", "generated_tokens", "complete", "model", "found_in")
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FOUND_IN_FIELD_NUMBER: _ClassVar[int]
    trace_id: str
    request_id: str
    start_unix_nano: int
    duration_ms: float
    prompt_tokens: int
    generated_tokens: int
    complete: bool
    model: str
    found_in: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, trace_id: _Optional[str] = ..., request_id: _Optional[str] = ..., start_unix_nano: _Optional[int] = ..., duration_ms: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., complete: _Optional[bool] = ..., model: _Optional[str] = ..., found_in: _Optional[_Iterable[str]] = ...) -> None: ...

class SlowestTracesResponse(_message.Message):
    __slots__ = ("requests", "where")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SlowTrace]
    where: str
    def __init__(self, requests: _Optional[_Iterable[_Union[SlowTrace, _Mapping]]] = ..., where: _Optional[str] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("trace_id", "request_id", "dry_run")
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    trace_id: str
    request_id: str
    dry_run: bool
    def __init__(self, trace_id: _Optional[str] = ..., request_id: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ForgetTable(_message.Message):
    __slots__ = ("table", "rows_before", "deleted")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    ROWS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    table: str
    rows_before: int
    deleted: int
    def __init__(self, table: _Optional[str] = ..., rows_before: _Optional[int] = ..., deleted: _Optional[int] = ...) -> None: ...

class ForgetResponse(_message.Message):
    __slots__ = ("selector", "id", "dry_run", "where", "requests", "whole_traces", "tables", "tables_absent", "previously_forgotten", "recorded")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WHOLE_TRACES_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    TABLES_ABSENT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUSLY_FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    selector: str
    id: str
    dry_run: bool
    where: str
    requests: _containers.RepeatedCompositeFieldContainer[RequestRef]
    whole_traces: _containers.RepeatedScalarFieldContainer[str]
    tables: _containers.RepeatedCompositeFieldContainer[ForgetTable]
    tables_absent: _containers.RepeatedScalarFieldContainer[str]
    previously_forgotten: str
    recorded: bool
    def __init__(self, selector: _Optional[str] = ..., id: _Optional[str] = ..., dry_run: _Optional[bool] = ..., where: _Optional[str] = ..., requests: _Optional[_Iterable[_Union[RequestRef, _Mapping]]] = ..., whole_traces: _Optional[_Iterable[str]] = ..., tables: _Optional[_Iterable[_Union[ForgetTable, _Mapping]]] = ..., tables_absent: _Optional[_Iterable[str]] = ..., previously_forgotten: _Optional[str] = ..., recorded: _Optional[bool] = ...) -> None: ...
