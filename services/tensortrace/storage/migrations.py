"""Numbered ClickHouse schema migrations: the one source of truth for the storage schema.

Each migration is (version, name, [statements]); statements are templates with `{db}` (database),
`{ttl_days}` (retention) and `{payload_codec}` filled by `schema.apply_migrations`. A migration is
applied once, in order, and recorded in `{db}.schema_migrations`. Never edit a migration that has
shipped: add the next number. The layout and the reasons for it are in docs/storage.md.
"""

from __future__ import annotations

# Enum values are the proto enum numbers (records.proto), so a row can be turned back into a record
# without a lookup table, and names stay readable in SQL (`WHERE phase = 'decode'`).
_PHASE = "Enum8('unspecified' = 0, 'prefill' = 1, 'decode' = 2)"
_POSITIONS_KIND = "Enum8('unspecified' = 0, 'token_range' = 1, 'token_list' = 2, 'no_token_axis' = 3)"
_ENCODING = "Enum8('unspecified' = 0, 'raw' = 1, 'zstd' = 2, 'shuffle_zstd' = 3, 'lz4' = 4)"
# Timestamps: nanoseconds since the epoch. Delta then ZSTD: rows of one insert are near-monotonic.
_TS = "DateTime64(9, 'UTC') CODEC(Delta, ZSTD(1))"

_ACTIVATIONS = f"""
CREATE TABLE IF NOT EXISTS {{db}}.activations (
    trace_id            FixedString(16),
    span_id             FixedString(8),
    request_id          String CODEC(ZSTD(1)),
    model               LowCardinality(String),
    hook                LowCardinality(String),
    layer               Int32,
    tp_rank             UInt16,
    tp_size             UInt16,
    positions_kind      {_POSITIONS_KIND},
    token_start         UInt32,
    token_end           UInt32,
    positions           Array(UInt32),
    phase               {_PHASE},
    step                UInt64 CODEC(Delta, ZSTD(1)),
    dtype               LowCardinality(String),
    shape               Array(Int64),
    encoding            {_ENCODING},
    raw_size            UInt64,
    payload             String CODEC({{payload_codec}}),
    capture_time        {_TS},
    export_time         {_TS},
    load_time           {_TS},
    producer_node       LowCardinality(String),
    producer_pod        LowCardinality(String),
    producer_pid        UInt32,
    producer_rank       UInt32,
    producer_generation UInt64,
    seq                 UInt64 CODEC(Delta, ZSTD(1)),
    kafka_partition     UInt32,
    kafka_offset        UInt64 CODEC(Delta, ZSTD(1)),
    INDEX idx_request_id request_id TYPE bloom_filter(0.01) GRANULARITY 1,
    PROJECTION by_hook_layer (
        SELECT model, hook, layer, capture_time, trace_id, request_id, token_start, token_end, raw_size
        ORDER BY model, hook, layer, capture_time
    )
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(capture_time)
ORDER BY (trace_id, hook, layer, token_start, tp_rank, producer_pod, producer_pid, producer_generation, seq)
TTL toDateTime(capture_time) + INTERVAL {{ttl_days}} DAY
SETTINGS index_granularity = 1024,
         index_granularity_bytes = 4194304,
         ttl_only_drop_parts = 1,
         non_replicated_deduplication_window = 1000,
         deduplicate_merge_projection_mode = 'rebuild'
"""

_REQUESTS = f"""
CREATE TABLE IF NOT EXISTS {{db}}.requests (
    trace_id            FixedString(16),
    span_id             FixedString(8),
    request_id          String,
    model               LowCardinality(String),
    records_captured    UInt64,
    records_dropped     UInt64,
    dropped_by_reason   Map(LowCardinality(String), UInt64),
    bytes_captured      UInt64,
    complete            Bool,
    incomplete_reason   String,
    prompt_tokens       UInt32,
    generated_tokens    UInt32,
    finish_reason       LowCardinality(String),
    hooks               Array(LowCardinality(String)),
    sampled             Bool,
    start_time          {_TS},
    end_time            {_TS},
    export_time         {_TS},
    load_time           {_TS},
    producer_node       LowCardinality(String),
    producer_pod        LowCardinality(String),
    producer_pid        UInt32,
    producer_rank       UInt32,
    producer_generation UInt64,
    seq                 UInt64,
    kafka_partition     UInt32,
    kafka_offset        UInt64,
    INDEX idx_request_id request_id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(end_time)
ORDER BY (trace_id, request_id, producer_pod, producer_pid, producer_generation, seq)
TTL toDateTime(end_time) + INTERVAL {{ttl_days}} DAY
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1
"""

# trace id -> (request ids, capture time bounds): the read path's first hop, like otel_traces'
# trace_id_ts. It turns "find this trace" into a primary-key lookup in a tiny table, and its time
# bounds let the activations query prune every partition but the request's own day(s).
_ACTIVATION_TRACES = """
CREATE TABLE IF NOT EXISTS {db}.activation_traces (
    trace_id     FixedString(16),
    request_id   String,
    model        LowCardinality(String),
    first_capture SimpleAggregateFunction(min, DateTime64(9, 'UTC')),
    last_capture  SimpleAggregateFunction(max, DateTime64(9, 'UTC')),
    INDEX idx_request_id request_id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(first_capture)
ORDER BY (trace_id, request_id, model)
TTL toDateTime(last_capture) + INTERVAL {ttl_days} DAY
SETTINGS ttl_only_drop_parts = 1
"""

_ACTIVATION_TRACES_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.activation_traces_mv TO {db}.activation_traces AS
SELECT trace_id, request_id, model, min(capture_time) AS first_capture, max(capture_time) AS last_capture
FROM {db}.activations
GROUP BY trace_id, request_id, model
"""

# RequestSummary.producers (records.proto field 21): how many TP ranks write a summary for the
# request; the completeness rule waits for all of them. Rows written before it read as 1.
_REQUESTS_PRODUCERS = "ALTER TABLE {db}.requests ADD COLUMN IF NOT EXISTS producers UInt16 DEFAULT 1 AFTER sampled"

# One row per (request, probe version): the probe service's scores (tensortrace.v1.ProbeScore, read
# off the scores topic by the loader). A killed-and-restarted probe service re-publishes a score
# with the same identity (trace_id, request_id, probe, probe_hash): the sort key, so merges collapse
# re-reads and reads collapse them with FINAL (or LIMIT 1 BY the identity); scored_time is the
# version, so the latest verdict on a request wins. Partitioned and expired by scored_time (always
# set; request_end_time is 0 for a request whose summary never came).
_PROBE_SCORES = f"""
CREATE TABLE IF NOT EXISTS {{db}}.probe_scores (
    trace_id            FixedString(16),
    span_id             FixedString(8),
    request_id          String CODEC(ZSTD(1)),
    model               LowCardinality(String),
    probe               LowCardinality(String),
    probe_hash          String,
    score               Float64,
    threshold           Float64,
    flagged             Bool,
    shadow              Bool,
    complete            Bool,
    incomplete_reason   String,
    hook                LowCardinality(String),
    layers              Array(Int32),
    pooling             LowCardinality(String),
    tokens_scored       UInt32,
    token_scores        Array(Float32),
    token_positions     Array(UInt32),
    request_end_time    {_TS},
    scored_time         {_TS},
    release             LowCardinality(String),
    load_time           {_TS},
    kafka_partition     UInt32,
    kafka_offset        UInt64,
    INDEX idx_request_id request_id TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = ReplacingMergeTree(scored_time)
PARTITION BY toDate(scored_time)
ORDER BY (trace_id, request_id, probe, probe_hash)
TTL toDateTime(scored_time) + INTERVAL {{ttl_days}} DAY
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1
"""

# What `tensortrace forget` deleted (storage/forget.py): one row per forgotten trace id or request id,
# so that the loader's sweep deletes the request again if Kafka delivers it again (a loader re-reading
# from an older offset, records still in flight when it was forgotten). `whole_traces`: the trace ids
# whose spans were all forgotten (a trace id forget, or a request that was its trace's only one).
# Tiny (one row per data-subject request), so no partitions: its TTL (`forgotten` retention, default
# 30 days: at least the topics' retention.ms) deletes rows, and the latest forget of an id wins.
_FORGOTTEN = """
CREATE TABLE IF NOT EXISTS {db}.forgotten (
    selector     Enum8('trace_id' = 1, 'request_id' = 2),
    value        String,
    whole_traces Array(String),
    forgotten_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(forgotten_at)
ORDER BY (selector, value)
TTL toDateTime(forgotten_at) + INTERVAL 30 DAY
"""

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "activations, requests, activation_traces", [_ACTIVATIONS, _REQUESTS, _ACTIVATION_TRACES, _ACTIVATION_TRACES_MV]),
    (2, "requests.producers", [_REQUESTS_PRODUCERS]),
    (3, "probe_scores", [_PROBE_SCORES]),
    (4, "forgotten", [_FORGOTTEN]),
]
