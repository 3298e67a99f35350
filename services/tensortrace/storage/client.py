"""One clickhouse-connect client shared by threads, and the loader's Arrow insert.

    shared = ThreadSafeClient(connect("chdb:///tmp/tt"))
    path = shared.insert_arrow_batch("tt.activations", arrow_table, {"insert_deduplication_token": "a:t/0/0-9"})

chDB runs the engine inside this process and a path can be opened by one process only, so the
loader's insert thread and the query service's handlers share one client; clickhouse-connect
clients are not thread-safe, hence every call is serialised.

`insert_arrow_batch` is how the loader inserts. On an embedded chDB engine it runs
`INSERT INTO t (...) SETTINGS ... SELECT ... FROM Python(table)` on the engine handle the client
already holds: the engine reads the Arrow table's buffers in place. clickhouse-connect's
`insert_arrow` instead serialises the table to Arrow IPC, writes it to a temporary file and has the
engine parse that file (`INSERT ... FROM INFILE ... FORMAT Arrow`): two more copies of every payload
and a file write. Measured on the loader's own 4 KiB batches (scripts/bench/chdb_insert.py,
docs/BENCHMARKS.md "Loader throughput", session 6) the in-place insert takes about half the CPU
per GB. The guarantees are the same: the statement carries the same settings, so a retried batch
with the same insert_deduplication_token is dropped by the engine as before (INSERT ... SELECT
deduplicates by token like INSERT ... FORMAT; tests/storage/test_insert_path.py), and the rows are
the same bytes (no conversion on our side). Anywhere else (a ClickHouse server over HTTP, a client
wrapped by something that is not a clickhouse-connect chDB client, a clickhouse-connect without the
handle this relies on) it is `insert_arrow`.

A table may carry binary_view columns (the loader's payloads: views into the Kafka messages, no
copy; loader/rows.py). chDB's Python() reads them in place; every other path gets them as plain
large_binary first (`plain_binary`), since a server's Arrow reader need not know views.

The chDB path runs the insert with `max_threads = 1` unless told otherwise: the Python() source is
then read as one stream, so rows reach the table in the order the loader built them (already in the
table's ORDER BY, loader/rows.py, so the engine need not sort them), and the insert leaves the
machine's other cores to the consumer and the broker; on the benchmark it was also faster.
"""

from __future__ import annotations

import logging
import re
import threading

log = logging.getLogger("tensortrace.storage")

INSERT_PATH_CHDB = "chdb-python"          # INSERT ... SELECT FROM Python(arrow) on the engine handle
INSERT_PATH_ARROW = "insert_arrow"        # clickhouse-connect's insert_arrow (Arrow IPC through a file or HTTP)

_SETTING = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


class ThreadSafeClient:
    """Serialises calls on one clickhouse-connect client (attributes pass through unlocked)."""

    def __init__(self, client):
        self.client = client
        self._lock = threading.Lock()
        self._chdb = _chdb_handle(client)

    @property
    def insert_path(self) -> str:
        """Which way insert_arrow_batch inserts: INSERT_PATH_CHDB or INSERT_PATH_ARROW."""
        return INSERT_PATH_CHDB if self._chdb is not None else INSERT_PATH_ARROW

    def insert_arrow_batch(self, table: str, arrow, settings: dict | None = None) -> str:
        """Insert a pyarrow.Table into `table` ([db.]name) with per-insert `settings`; returns the path
        taken (module docstring). Raises what the engine or the client raises (the caller retries)."""
        with self._lock:
            if self._chdb is None:
                self.client.insert_arrow(table, plain_binary(arrow), settings=settings)
                return INSERT_PATH_ARROW
            insert_python(self._chdb, table, arrow, {"max_threads": 1, **(settings or {})})
            return INSERT_PATH_CHDB

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def locked(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)
        return locked


def plain_binary(table):
    """The pyarrow.Table with binary_view / string_view columns as large_binary / large_string (those
    columns copied, the others shared)."""
    import pyarrow as pa

    for i, f in enumerate(table.schema):
        if f.type in (pa.binary_view(), pa.string_view()):
            typ = pa.large_binary() if f.type == pa.binary_view() else pa.large_string()
            table = table.set_column(i, f.name, table.column(i).cast(typ))
    return table


def _chdb_handle(client):
    """The engine handle of a clickhouse-connect chDB client (an object with `conn`, a chdb
    Connection, and `lock`, which every call of that client holds), or None: not such a client, or
    a clickhouse-connect that keeps it elsewhere (then the loader takes insert_arrow, and says so)."""
    try:
        from clickhouse_connect.driver._chdbclient import ChdbClient
    except ImportError:
        return None
    if not isinstance(client, ChdbClient):
        return None
    handle = getattr(getattr(client, "_backend", None), "_handle", None)
    if handle is None or not hasattr(handle, "conn") or not hasattr(handle, "lock"):
        log.warning("clickhouse-connect's chDB client has no engine handle where this version expects it; "
                    "inserting through insert_arrow (slower, same rows)")
        return None
    return handle


def _quote(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def insert_python(handle, table: str, arrow, settings: dict) -> None:
    """INSERT the Arrow table through chDB's Python() table function on `handle` (see _chdb_handle)."""
    if not _TABLE.match(table):
        raise ValueError(f"table {table!r} is not [db.]name of plain identifiers")
    for what, names in (("setting", settings), ("column", arrow.column_names)):
        for k in names:
            if not _SETTING.match(k):
                raise ValueError(f"{what} name {k!r} is not a plain identifier")
    cols = ", ".join(f"`{c}`" for c in arrow.column_names)
    clause = (" SETTINGS " + ", ".join(f"{k} = {_quote(v)}" for k, v in settings.items())) if settings else ""
    tt_batch = arrow          # noqa: F841 -- Python(tt_batch) resolves this name in this frame
    sql = f"INSERT INTO {table} ({cols}){clause} SELECT {cols} FROM Python(tt_batch)"
    with handle.lock:
        if handle.conn is None:
            raise ConnectionError(f"insert into {table}: the chDB client is closed")
        handle.conn.query(sql, "TabSeparated")
