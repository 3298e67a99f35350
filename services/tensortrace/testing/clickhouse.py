"""ClickHouse for tests: rows inserted the way the loader inserts them, without Kafka, and row counts
of an embedded chDB path read by another process.

    insert_rows(client, db, req.records, [req.summary])     # ColumnBatch -> insert_arrow, as the loader
    counts = count_rows(tmp_path / "chdb", "tensortrace")  # {"raw", "distinct", "final", ...}

chDB opens one engine path per process and only while no other process holds it, so `count_rows`
runs in a child process, after the loader that owned the path exited.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tensortrace.loader.rows import ColumnBatch


def insert_rows(client, db: str, records=(), summaries=(), partition: int = 0) -> None:
    """Insert TensorRecords into `db.activations` and RequestSummaries into `db.requests` (record i
    at Kafka offset i of `partition`; summaries at offset 10**6)."""
    b = ColumnBatch()
    for i, r in enumerate(records):
        b.add_tensor(r, partition, i)
    for s in summaries:
        b.add_summary(s, partition, 10**6)
    if b.tensor_rows:
        client.insert_arrow(f"{db}.activations", b.activations_table(time.time_ns()))
    if b.summary_rows:
        client.insert_arrow(f"{db}.requests", b.requests_table(time.time_ns()))


_COUNT_ROWS = r"""
import json, sys, clickhouse_connect
c = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
db = sys.argv[2]
q = lambda s: c.query(s).result_rows[0][0]
out = {"raw": q(f"SELECT count() FROM {db}.activations"),
       "distinct": q(f"SELECT uniqExact(producer_pod, producer_pid, producer_generation, seq) FROM {db}.activations"),
       "final": q(f"SELECT count() FROM {db}.activations FINAL"),
       "summaries_final": q(f"SELECT count() FROM {db}.requests FINAL")}
c.command(f"OPTIMIZE TABLE {db}.activations FINAL")
c.command(f"OPTIMIZE TABLE {db}.requests FINAL")
out["raw_after_merge"] = q(f"SELECT count() FROM {db}.activations")
out["summaries_after_merge"] = q(f"SELECT count() FROM {db}.requests")
print(json.dumps(out))
"""


def count_rows(chdb_path, db: str) -> dict[str, int]:
    """Row counts of the loader's tables on a chDB path, read (then merged) by a child process:
    raw (duplicates from re-reads included), distinct records, FINAL, and after OPTIMIZE ... FINAL."""
    r = subprocess.run([sys.executable, "-c", _COUNT_ROWS, str(chdb_path), db], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
