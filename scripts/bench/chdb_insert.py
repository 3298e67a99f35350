"""The embedded engine's own insert ceiling for the loader's 4 KiB rows: no Kafka, one process.

    .venv/bin/python scripts/bench/chdb_insert.py [--records 40000] [--batch-rows 10000] [--repeats 3] \
        [--variants all|name,name] [--json .cache/bench/chdb_insert.json]

What it inserts: the loader benchmark's records (scripts/bench/loader_throughput.py build_messages:
bf16 Gaussian rows of hidden 2048, 32 per envelope), scanned natively and sealed into the loader's
own `ColumnBatch` every `--batch-rows` rows (the loader seals at 20,000 rows / 64 MiB / 0.25 s; in
the end-to-end benchmark its 40,000 4 KiB rows went in 4-5 batches, ~8-10k rows each). Each batch
becomes the loader's Arrow table (`activations_table`, built before the clock starts: the flush
thread's Arrow share is measured by consume_decode.py) and is inserted into `activations` of a
fresh database made by the project's migrations (`schema.apply_migrations`: ReplacingMergeTree,
projection, materialized view, bloom index), with an insert_deduplication_token per batch as the
loader sends it. Every variant runs `--repeats` times, alternating, so all see the same load; the
median run is reported, with wall MB/s (payload bytes / seconds) and the process's CPU seconds
(chDB's threads included) per GB.

Insert paths (`path`):
  loader         the loader's own call (ThreadSafeClient.insert_arrow_batch, storage/client.py) with the
                 settings ClickHouseSink.flush sends: chdb_python below, max_threads 1, optimize_on_insert 0
  cc_arrow       clickhouse-connect `insert_arrow` (the loader before session 6): Arrow IPC ->
                 a temp file -> `INSERT ... FROM INFILE ... FORMAT Arrow`
  cc_arrow_shm   the same with the temp file on /dev/shm (what the file on disk costs)
  cc_native      clickhouse-connect `insert` (Native column format, built in Python/C) -> temp file
  chdb_arrowstream  chDB's own connection: `send_insert(..., "ArrowStream")` fed the IPC bytes
  chdb_python    chDB's own connection: `INSERT INTO ... SELECT ... FROM Python(table)`, the engine
                 reads the Arrow table's buffers in place
Rows are in the order the loader now builds them (loader/rows.py: the table's ORDER BY, so the engine
skips its sort) unless a variant says "arrival" (Kafka's order: how the loader built them before), and
their payloads are binary_view (views into the Kafka messages) on the chdb_python / loader paths
unless it says "gathered" or "arrival"; the clickhouse-connect and ArrowStream paths always get them
copied into one large_binary buffer, as the loader built them before (outside the clock).
Settings and table variants are named by their difference (payload codec, dedup token, optimize_on_insert,
max_threads, the projection / view / index dropped for attribution only). `--dir /dev/shm` puts the
engine's files on tmpfs: the engine's CPU alone, without the disk's writeback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# name -> (path, payload codec, extra insert settings, token?, tweaks). Rows are in the loader's order
# (loader/rows.py: the table's ORDER BY) unless "arrival" (the order they came from Kafka, as the loader
# built them before session 6). "loader" is the loader's own call: ThreadSafeClient.insert_arrow_batch
# with the settings ClickHouseSink.flush sends (token + optimize_on_insert = 0).
VARIANTS = {
    "before:cc_arrow+arrival": ("cc_arrow", "Default", {}, True, {"arrival"}),
    "loader": ("loader", "Default", {"optimize_on_insert": 0}, True, set()),
    # the payload copied into one buffer (large_binary) instead of views into the messages
    "loader+gathered": ("loader", "Default", {"optimize_on_insert": 0}, True, {"gathered"}),
    # the insert paths, on the rows as the loader built them before
    "cc_arrow_shm+arrival": ("cc_arrow_shm", "Default", {}, True, {"arrival"}),
    "cc_native+arrival": ("cc_native", "Default", {}, True, {"arrival"}),
    "chdb_arrowstream+arrival": ("chdb_arrowstream", "Default", {}, True, {"arrival"}),
    "chdb_python+arrival": ("chdb_python", "Default", {}, True, {"arrival"}),
    # then one change at a time towards the loader's
    "chdb_python+sorted": ("chdb_python", "Default", {}, True, set()),
    "chdb_python+arrival+no_optimize": ("chdb_python", "Default", {"optimize_on_insert": 0}, True, {"arrival"}),
    "chdb_python+sorted+no_optimize": ("chdb_python", "Default", {"optimize_on_insert": 0}, True, set()),
    "cc_arrow+sorted+no_optimize": ("cc_arrow", "Default", {"optimize_on_insert": 0}, True, set()),
    # the loader's path with one setting or table feature changed
    "loader+payload_NONE": ("loader", "NONE", {"optimize_on_insert": 0}, True, set()),
    "loader+payload_ZSTD1": ("loader", "ZSTD(1)", {"optimize_on_insert": 0}, True, set()),
    "loader+max_threads_2": ("loader", "Default", {"optimize_on_insert": 0, "max_threads": 2}, True, set()),
    # without a token the engine hashes every block (sipHash of ~40 MB) to deduplicate retries
    "loader-token": ("loader", "Default", {"optimize_on_insert": 0}, False, set()),
    # attribution only (not shippable): what the projection, the view and the bloom index cost per insert
    "loader-projection": ("loader", "Default", {"optimize_on_insert": 0}, True, {"projection"}),
    "loader-view": ("loader", "Default", {"optimize_on_insert": 0}, True, {"mv"}),
    "loader-bloom_index": ("loader", "Default", {"optimize_on_insert": 0}, True, {"index"}),
}
DEFAULT = ",".join(VARIANTS)


def make_batches(records: int, batch_rows: int):
    """The loader's ColumnBatches of the loader benchmark's 4 KiB records, natively scanned."""
    from loader_throughput import build_messages

    from tensortrace.loader.rows import ColumnBatch
    from tensortrace.wire import native

    if not native.enabled():
        raise SystemExit(f"chdb_insert: {native.why_disabled()}")
    batches, cur, offset = [], ColumnBatch(), 0
    for offset, (_, value) in enumerate(build_messages(records, 1, 2048, 32)):
        cur.add_scan(native.scan(value), 0, offset)
        if cur.rows >= batch_rows:
            batches.append((cur, f"a:bench/0/{offset - 10**6}-{offset}"))
            cur = ColumnBatch()
    if cur.rows:
        batches.append((cur, f"a:bench/0/x-{offset}"))
    return batches


def tweak_schema(client, db: str, tweaks: set) -> None:
    if "projection" in tweaks:
        client.command(f"ALTER TABLE {db}.activations DROP PROJECTION by_hook_layer")
    if "mv" in tweaks:
        client.command(f"DROP VIEW {db}.activation_traces_mv")
    if "index" in tweaks:
        client.command(f"ALTER TABLE {db}.activations DROP INDEX idx_request_id")


def inserter(path: str, client, conn):
    """insert(table, arrow, settings) for one path."""
    import pyarrow as pa

    from tensortrace.storage import ThreadSafeClient

    shared = ThreadSafeClient(client)

    def loader(table, arrow, settings):
        shared.insert_arrow_batch(table, arrow, settings)

    def cc_arrow(table, arrow, settings):
        client.insert_arrow(table, arrow, settings=settings)

    def cc_arrow_shm(table, arrow, settings):
        old = tempfile.tempdir
        tempfile.tempdir = "/dev/shm"
        try:
            client.insert_arrow(table, arrow, settings=settings)
        finally:
            tempfile.tempdir = old

    def cc_native(table, arrow, settings):
        # clickhouse-connect wants Python columns; the conversion is timed with the insert (the cost of the path)
        cols = [c.to_numpy(zero_copy_only=False) if pa.types.is_integer(c.type) else c.to_pylist() for c in arrow.columns]
        client.insert(table, cols, column_names=arrow.column_names, column_oriented=True, settings=settings)

    def _clause(settings):
        return (" SETTINGS " + ", ".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}"
                                         for k, v in settings.items())) if settings else ""

    def chdb_arrowstream(table, arrow, settings):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, arrow.schema) as w:
            w.write_table(arrow)
        cols = ", ".join(arrow.column_names)
        ins = conn.send_insert(f"INSERT INTO {table} ({cols}){_clause(settings)}", "ArrowStream")
        ins.append(sink.getvalue().to_pybytes())
        ins.finish()

    def chdb_python(table, arrow, settings):
        cols = ", ".join(arrow.column_names)
        conn.query(f"INSERT INTO {table} ({cols}){_clause(settings)} SELECT {cols} FROM Python(arrow)")

    return locals()[path]


def run_variant(name, batches, client, conn, payload_mb) -> dict:
    from tensortrace.storage import schema
    from tensortrace.storage.client import plain_binary

    path, codec, extra, token, tweaks = VARIANTS[name]
    db = f"bench_ins_{uuid.uuid4().hex[:8]}"
    schema.apply_migrations(client, db, payload_codec=codec)
    tweak_schema(client, db, tweaks)
    insert = inserter(path, client, conn)
    tables = [(b.activations_table(time.time_ns()), tok) for b, tok in batches]
    if {"gathered", "arrival"} & tweaks or path.startswith(("cc_", "chdb_arrowstream")):   # outside the clock
        tables = [(plain_binary(t), tok) for t, tok in tables]      # payloads copied, as before session 6
    if "arrival" in tweaks:     # outside the clock: the rows in the order Kafka delivered them
        tables = [(t.sort_by([("kafka_offset", "ascending"), ("seq", "ascending")]), tok) for t, tok in tables]
    load0 = os.getloadavg()[0]
    c0 = os.times()
    t0 = time.perf_counter()
    for arrow, tok in tables:
        settings = dict(extra)
        if token:
            settings["insert_deduplication_token"] = f"{tok}:{db}"
        insert(f"{db}.activations", arrow, settings)
    secs = time.perf_counter() - t0
    c1 = os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    n = int(client.command(f"SELECT count() FROM {db}.activations"))
    expected = sum(t.num_rows for t, _ in tables)
    if n != expected:
        raise SystemExit(f"chdb_insert: variant {name}: {n} rows in {db}.activations, expected {expected}")
    client.command(f"DROP DATABASE {db} SYNC")
    return {"variant": name, "path": path, "payload_codec": codec, "settings": extra, "token": token, "tweaks": sorted(tweaks),
            "seconds": secs, "MB_per_s": payload_mb / secs, "cpu_s": cpu, "cpu_s_per_GB": cpu / payload_mb * 1e3,
            "load_avg": load0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=40_000, help="4 KiB records per run")
    p.add_argument("--batch-rows", default="10000", help="rows per sealed batch; comma-separated to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=DEFAULT, help=f"comma-separated, or 'all': {', '.join(VARIANTS)}")
    p.add_argument("--dir", default=None, help="parent directory of the engine's path (default: the temp dir, "
                   "a disk here, as the loader benchmark; /dev/shm takes the disk out)")
    p.add_argument("--json", default=".cache/bench/chdb_insert.json")
    a = p.parse_args(argv)
    names = list(VARIANTS) if a.variants == "all" else [v for v in a.variants.split(",") if v]
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"chdb_insert: unknown variant {n!r}; known: {', '.join(VARIANTS)}")
    import chdb
    import clickhouse_connect

    path = tempfile.mkdtemp(prefix="tt-chdb-insert-", dir=a.dir)
    client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
    conn = chdb.connect(os.path.realpath(path))       # a second handle on the same engine
    result = {"benchmark": "chdb_insert", "machine": f"{os.cpu_count()} cores, shared", "argv": sys.argv[1:],
              "records": a.records, "row_bytes": 4096, "engine_dir": os.path.dirname(path), "load_avg_start": os.getloadavg(), "runs": []}
    rows_out = []
    try:
        for batch_rows in [int(x) for x in a.batch_rows.split(",")]:
            batches = make_batches(a.records, batch_rows)
            payload_mb = sum(b.payload_bytes for b, _ in batches) / 1e6
            runs = {n: [] for n in names}
            for _ in range(a.repeats):
                for n in names:         # alternating: every variant sees the same load
                    r = run_variant(n, batches, client, conn, payload_mb)
                    r["batch_rows"], r["batches"] = batch_rows, len(batches)
                    runs[n].append(r)
                    result["runs"].append(r)
                    print(json.dumps(r), flush=True)
            for n in names:
                ordered = sorted(runs[n], key=lambda r: r["MB_per_s"])
                med = ordered[len(ordered) // 2]
                rows_out.append((n, batch_rows, len(batches), med["MB_per_s"], [r["MB_per_s"] for r in runs[n]],
                                 statistics.median(r["cpu_s_per_GB"] for r in runs[n]),
                                 statistics.median(r["load_avg"] for r in runs[n])))
    finally:
        conn.close()
        client.close()
        shutil.rmtree(path, ignore_errors=True)
    result["load_avg_end"] = os.getloadavg()
    result["summary"] = [{"variant": n, "batch_rows": br, "batches": nb, "MB_per_s_median": m, "runs_MB_per_s": rs,
                          "cpu_s_per_GB_median": c, "load_avg_median": la} for n, br, nb, m, rs, c, la in rows_out]
    print()
    print(f"{'variant':<34}{'rows/batch':>11}{'MB/s med':>10}  {'runs':<24}{'CPU s/GB':>9}{'load':>6}")
    for n, br, nb, m, rs, c, la in rows_out:
        print(f"{n:<34}{br:>11,}{m:>10.1f}  {', '.join(f'{x:.0f}' for x in rs):<24}{c:>9.2f}{la:>6.1f}")
    print(f"load average {result['load_avg_start']} -> {result['load_avg_end']}")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
