"""Retention per table, enforced by ClickHouse TTL: one parser, one place that knows every table's
time column, and one idempotent "make the table's TTL match the config" step run at every start.

    periods = parse_retention("activations=3d,requests=30d,probe_scores=36h")
    plan = table_periods(periods, default_days=7)      # every loader table -> Period
    changed = apply_retention(client, "tensortrace", plan)   # [(table, old TTL, new TTL)] it altered

Why TTL and not a cleanup job: ClickHouse drops whole expired parts itself (`ttl_only_drop_parts
= 1` on every table, and the tables are partitioned by day, so expiry drops a day's partition
without rewriting anything), on every replica, with nothing of ours running. What we own is that the
TTL written on each table is the configured one, checked at every start:

  * the wanted TTL is rendered in the normal form ClickHouse prints back (`toDateTime(col) +
    toIntervalDay(7)`), and compared with the TTL clause of the table's `create_table_query`;
  * only a table whose TTL differs is altered (`ALTER TABLE ... MODIFY TTL`, metadata only:
    `materialize_ttl_after_modify = 0`, so no mutation rewrites old parts), and each change is
    logged with the old and the new clause. A second start with the same config changes nothing;
  * a changed TTL is then recalculated for the parts already written (`MATERIALIZE TTL` with the
    table setting `materialize_ttl_recalculate_only = 1`: reads only the TTL column, rewrites each
    part's expiry, never the data; asynchronous). Without it a *shortened* retention would not
    reach old data at all: with `ttl_only_drop_parts` a part is dropped by the expiry stored when it
    was written (found on chDB 26.9: 3-day-old rows survived a 30 d -> 2 d change and OPTIMIZE FINAL).

Periods are whole hours or days (`36h`, `7d`); a TTL is on a DateTime (second precision), so
anything finer would be an illusion. Tables and their time columns (the column a row's age is
counted from) are TTL_COLUMNS; `activation_traces` (the trace-id index of `activations`, fed by a
materialized view) follows `activations` unless it is given on its own: an index row outliving its
tensors would only point at nothing, and one expiring earlier would hide tensors from the read path.
`schema_migrations` (migration versions, no user data) has no TTL. The spans tables
(`otel_traces`, `otel_traces_trace_id_ts`) are the bridge's (storage/otel.py, `--traces-ttl-days`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger("tensortrace.storage.retention")

# table -> the column a row's age is counted from (the same column the table is partitioned by, or
# the one that closes the row's life: a summary's end, a trace's last capture).
TTL_COLUMNS = {
    "activations": "capture_time",
    "requests": "end_time",
    "activation_traces": "last_capture",
    "probe_scores": "scored_time",
    "forgotten": "forgotten_at",
}
# How long a `tensortrace forget` is remembered (so the loader's sweep deletes a request re-read from
# Kafka after it was forgotten: storage/forget.py). Must be at least the longest retention.ms of
# the topics the project reads (activations, scores, spans); 30 days covers Kafka's default 7.
DEFAULT_FORGOTTEN_DAYS = 30

_PERIOD = re.compile(r"^\s*(\d{1,6})\s*([hd])\s*$")
_TTL_CLAUSE = re.compile(r"\sTTL\s+(.*?)\s+SETTINGS\s", re.S)


@dataclass(frozen=True)
class Period:
    """A retention period: a whole number of hours or days."""
    value: int
    unit: str   # "h" | "d"

    @property
    def hours(self) -> int:
        return self.value * (24 if self.unit == "d" else 1)

    def interval(self) -> str:
        """The interval as ClickHouse prints it back in a TTL clause."""
        return f"toIntervalDay({self.value})" if self.unit == "d" else f"toIntervalHour({self.value})"

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"


def parse_period(text: str, what: str = "retention") -> Period:
    """'7d' / '36h' -> Period; a clear ValueError otherwise (0 and other units are refused)."""
    m = _PERIOD.match(str(text))
    if not m:
        raise ValueError(f"{what} {text!r} is not a period like 7d or 36h (whole days d or hours h)")
    p = Period(int(m.group(1)), m.group(2))
    if p.value < 1:
        raise ValueError(f"{what} {text!r} must be at least 1h (a table cannot be kept for 0 time)")
    return p


def parse_retention(text: str) -> dict[str, Period]:
    """'activations=7d,requests=30d' -> {table: Period}; '' -> {}. Unknown tables, repeated tables
    and bad periods are refused, every one named in one ValueError."""
    out: dict[str, Period] = {}
    problems = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        table, eq, period = item.partition("=")
        table = table.strip()
        if not eq:
            problems.append(f"{item.strip()!r} is not table=period (e.g. activations=7d)")
            continue
        if table not in TTL_COLUMNS:
            problems.append(f"{table!r} is not a table with a retention (one of {', '.join(TTL_COLUMNS)})")
            continue
        if table in out:
            problems.append(f"{table} is given twice")
            continue
        try:
            out[table] = parse_period(period, f"retention of {table}")
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("; ".join(problems))
    return out


def table_periods(periods: dict[str, Period], default_days: int) -> dict[str, Period]:
    """Every table's period: the one given, else activation_traces follows activations, forgotten
    defaults to DEFAULT_FORGOTTEN_DAYS, and the rest to `default_days` (`--ttl-days`)."""
    if int(default_days) < 1:
        raise ValueError(f"ttl_days must be >= 1, got {default_days}")
    default = Period(int(default_days), "d")
    out = {}
    for table in TTL_COLUMNS:
        if table in periods:
            out[table] = periods[table]
        elif table == "activation_traces":
            out[table] = periods.get("activations", default)
        elif table == "forgotten":
            out[table] = Period(DEFAULT_FORGOTTEN_DAYS, "d")
        else:
            out[table] = default
    return out


def wanted_ttl(table: str, period: Period, recompress_after_hours: int = 0, recompress_codec: str = "ZSTD(1)") -> str:
    """The TTL clause (without 'TTL') for a table, in ClickHouse's normal form. `activations` also
    gets the payload recompression rule when it fires before expiry (docs/storage.md)."""
    col = f"toDateTime({TTL_COLUMNS[table]})"
    ttl = f"{col} + {period.interval()}"
    if table == "activations" and 0 < int(recompress_after_hours) < period.hours:
        ttl = f"{col} + toIntervalHour({int(recompress_after_hours)}) RECOMPRESS CODEC({recompress_codec}), {ttl}"
    return ttl


def current_ttl(client, database: str, table: str) -> str | None:
    """The table's TTL clause as ClickHouse prints it ('' when it has none); None: no such table."""
    rows = client.query("SELECT create_table_query FROM system.tables WHERE database = {d:String} AND name = {t:String}",
                        parameters={"d": database, "t": table}).result_rows
    if not rows:
        return None
    m = _TTL_CLAUSE.search(rows[0][0] + " ")
    return m.group(1).strip() if m else ""


def ensure_ttl(client, database: str, table: str, ttl: str) -> tuple[str, str] | None:
    """Make the table's TTL `ttl` if it is not already: (old, new) when it altered, None otherwise."""
    have = current_ttl(client, database, table)
    if have is None:
        raise LookupError(f"table {database}.{table} does not exist; cannot set its TTL")
    if _norm(have) == _norm(ttl):
        return None
    client.command(f"ALTER TABLE {database}.{table} MODIFY TTL {ttl}", settings={"materialize_ttl_after_modify": 0})
    # Parts already written keep the expiry computed when they were written (ttl_only_drop_parts
    # decides from it), so a shortened retention would not reach them. Recalculate it: with
    # materialize_ttl_recalculate_only the mutation reads only the TTL column and rewrites each
    # part's ttl.txt (no data is rewritten); parts now wholly expired are then dropped. Async: a
    # start never waits on it (system.mutations shows it).
    client.command(f"ALTER TABLE {database}.{table} MODIFY SETTING materialize_ttl_recalculate_only = 1")
    client.command(f"ALTER TABLE {database}.{table} MATERIALIZE TTL", settings={"mutations_sync": 0})
    log.info("retention: %s.%s TTL changed from %r to %r (existing parts' expiry recalculated in the background)",
             database, table, have or "(none)", ttl)
    return have, ttl


def apply_retention(client, database: str, periods: dict[str, Period], recompress_after_hours: int = 0,
                    recompress_codec: str = "ZSTD(1)") -> list[tuple[str, str, str]]:
    """Set every table's TTL to its period (tables of `periods`); returns [(table, old, new)] for the
    ones it changed. Idempotent: a table already at its TTL is not touched."""
    changed = []
    for table, period in periods.items():
        got = ensure_ttl(client, database, table, wanted_ttl(table, period, recompress_after_hours, recompress_codec))
        if got is not None:
            changed.append((table, got[0], got[1]))
    return changed


def _norm(ttl: str) -> str:
    return re.sub(r"\s+", " ", ttl).strip()
