"""`tensortrace forget`: delete one request's tensors, summaries, scores and spans from every table
the project stores, for a data-subject request; and the loader's sweep that keeps them deleted.

    tensortrace forget --request-id chatcmpl-42 --clickhouse http://user:pw@ch:8123 [--dry-run]
    tensortrace forget --trace-id 4bf92f3577b34da6a3ce929d0e0e4736 --clickhouse chdb:///var/lib/tensortrace/chdb
    tensortrace forget --request-id chatcmpl-42 --server query:50052 --tls-ca ca.crt --token-file forget.token

    f = Forgetter(client, database="tensortrace", otel_database="otel")
    report = f.forget(Target.parse(trace_id="4bf9..."))     # report.deleted: {table: rows}
    f.sweep()                                                 # the loader's timer: forgotten ids re-inserted?

What one forget deletes (docs/data-lifecycle.md has the whole map of what is stored where):

  table                         --trace-id T                    --request-id R
  activations, requests,        trace_id = T (every request     request_id = R (under every trace)
  activation_traces,            of the trace)
  probe_scores
  otel_traces                   TraceId = T                     spans naming R (`rid`, `tensortrace.request_id`)
                                                                + every span of a trace that holds no other request
  otel_traces_trace_id_ts       TraceId = T                     the traces whose spans all went

and then records the forgotten id in `forgotten` (migration 4) — unless `--dry-run`, which only
counts. Tables that do not exist in a ClickHouse (no bridge, a server holding only the spans) are
skipped, and the report says so; several `--clickhouse` DSNs are each forgotten in turn.

`--server` (query/forget.py; the query service's Forget RPC, role `forget`) runs this same Forgetter
in the process that serves queries: with an embedded chDB engine that is the loader, the only
process that can open the path, so a running loader need not be stopped. This module stays a
contract (no service or grpc imports): `parser()`, `parse_target()`, `run()` and `finish()` are
shared with query/forget.py, which adds the flags.

How rows are deleted: `ALTER TABLE ... DELETE WHERE ... SETTINGS mutations_sync = 2`, a mutation
that rewrites the parts holding matching rows and returns once it is done. Not a lightweight
`DELETE FROM`: that only masks the rows (the bytes stay on disk until a merge rewrites the part,
which for an old part may be never before its TTL), and ClickHouse refuses it on `activations`,
which has a projection (lightweight_mutation_projection_mode = throw). The replaced parts' files
are removed by ClickHouse after `old_parts_lifetime` (8 minutes by default). A DELETE is issued
only for tables with matching rows (counted first: the report's numbers), so forgetting twice
deletes nothing the second time and says it was already forgotten.

Why the `forgotten` table and the sweep: Kafka records cannot be deleted one by one. A request
still in a topic (the activations, scores and spans topics keep records for their retention.ms)
comes back if a consumer re-reads it — a loader that crashed before committing, a group reset to an
older offset, records still in flight when the forget ran. The loader therefore runs `sweep()` every
`--forget-sweep-s` (60 s): for each id in `forgotten` (kept for the `forgotten` retention, 30 days
by default: set it >= the topics' retention.ms), it counts matching rows and re-deletes them if any
came back. So a re-read request is visible for at most one sweep interval. The cost is a few point
queries per forgotten id per sweep (trace ids are the primary key of every table; request ids have
bloom-filter indexes); forgets are rare, so the table stays small.

Ids are validated before any SQL is made (a trace id is 32 hex characters, not all zeros; a
request id is 1-256 characters without control characters) and reach SQL only as bound
parameters; table and database names are checked identifiers.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from dataclasses import dataclass, field

from tensortrace.storage.otel import DEFAULT_OTEL_DATABASE, DEFAULT_TRACES_TABLE
from tensortrace.storage.schema import DEFAULT_DATABASE, check_identifier

log = logging.getLogger("tensortrace.forget")

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
MAX_REQUEST_ID = 256
# The project's own tables that hold request data, each with trace_id FixedString(16) and request_id.
REQUEST_TABLES = ("activations", "requests", "activation_traces", "probe_scores")
_SPAN_RID = "(SpanAttributes['rid'] = {rid:String} OR SpanAttributes['tensortrace.request_id'] = {rid:String})"


class ForgetInputError(ValueError):
    """A malformed trace id or request id (nothing was read or deleted)."""


@dataclass(frozen=True)
class Target:
    """What to forget: a whole trace (every request under it) or one request id (under any trace)."""
    selector: str   # "trace_id" | "request_id"
    value: str      # 32 lowercase hex chars | the request id

    @classmethod
    def parse(cls, trace_id: str | None = None, request_id: str | None = None) -> "Target":
        if (trace_id is None) == (request_id is None):
            raise ForgetInputError("give exactly one of a trace id or a request id")
        if trace_id is not None:
            t = str(trace_id).strip().lower()
            if not _HEX32.match(t):
                raise ForgetInputError(f"trace id {str(trace_id)[:80]!r} is not 32 hex characters")
            if not any(int(c, 16) for c in t):
                raise ForgetInputError("trace id is all zeros (invalid in W3C trace context)")
            return cls("trace_id", t)
        r = request_id
        if not isinstance(r, str) or not r:
            raise ForgetInputError("request id must be a non-empty string")
        if len(r) > MAX_REQUEST_ID:
            raise ForgetInputError(f"request id is {len(r)} characters, at most {MAX_REQUEST_ID}")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in r):
            raise ForgetInputError(f"request id {r[:80]!r} contains control characters")
        return cls("request_id", r)

    def __str__(self) -> str:
        return f"{self.selector} {self.value}"


@dataclass
class Step:
    """One table's part of a forget: the rows that match (counted before anything is deleted)."""
    table: str            # db.table
    where: str
    params: dict
    rows: int = 0


@dataclass
class ForgetReport:
    target: Target
    dry_run: bool
    requests: list[tuple[str, str]] = field(default_factory=list)   # (trace id hex, request id) found
    whole_traces: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)             # db.table -> rows matching before
    absent: list[str] = field(default_factory=list)                  # tables not in this ClickHouse
    deleted: dict[str, int] = field(default_factory=dict)            # db.table -> rows deleted
    previously_forgotten: str = ""                                   # when, if it was forgotten before
    recorded: bool = False                                           # written to `forgotten` (the sweep's list)
    where: str = ""

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def found(self) -> bool:
        """Something was stored, or the id was forgotten before (then nothing left is success)."""
        return self.total > 0 or bool(self.previously_forgotten)

    def as_dict(self) -> dict:
        return {"selector": self.target.selector, "id": self.target.value, "dry_run": self.dry_run,
                "where": self.where, "requests": [{"trace_id": t, "request_id": r} for t, r in self.requests],
                "whole_traces": self.whole_traces, "rows_before": self.counts, "deleted": self.deleted,
                "deleted_total": sum(self.deleted.values()), "tables_absent": self.absent,
                "previously_forgotten": self.previously_forgotten, "recorded": self.recorded}


class Forgetter:
    """Forgets requests in one ClickHouse (a clickhouse-connect client, or a ThreadSafeClient)."""

    def __init__(self, client, database: str = DEFAULT_DATABASE, otel_database: str = DEFAULT_OTEL_DATABASE,
                 traces_table: str = DEFAULT_TRACES_TABLE, where: str = ""):
        self.client = client
        self.db = check_identifier(database)
        self.odb = check_identifier(otel_database)
        self.traces = check_identifier(traces_table, "table")
        self.where_label = where

    # -- plumbing ------------------------------------------------------------------------------

    def _rows(self, sql: str, params: dict | None = None) -> list:
        return self.client.query(sql, parameters=params or {}).result_rows

    def _tables(self) -> set[tuple[str, str]]:
        rows = self._rows("SELECT database, name FROM system.tables WHERE database IN {dbs:Array(String)}",
                          {"dbs": sorted({self.db, self.odb})})
        return {(d, n) for d, n in rows}

    # -- what matches ----------------------------------------------------------------------------

    def plan(self, target: Target, whole_traces: list[str] | None = None) -> tuple[ForgetReport, list[Step]]:
        """Count what `target` matches in every table (deletes nothing). `whole_traces` (the sweep):
        the traces whose spans were all forgotten, as recorded; otherwise worked out now."""
        have = self._tables()
        rep = ForgetReport(target, dry_run=True, where=self.where_label)
        ours = [t for t in REQUEST_TABLES if (self.db, t) in have]
        rep.absent += [f"{self.db}.{t}" for t in REQUEST_TABLES if (self.db, t) not in have]
        spans = (self.odb, self.traces) in have
        index = (self.odb, f"{self.traces}_trace_id_ts") in have
        if not spans:
            rep.absent.append(f"{self.odb}.{self.traces}")
        if not index:
            rep.absent.append(f"{self.odb}.{self.traces}_trace_id_ts")

        if target.selector == "trace_id":
            cond, params = "trace_id = unhex({tid:String})", {"tid": target.value}
        else:
            cond, params = "request_id = {rid:String}", {"rid": target.value}
        found: dict[tuple[str, str], None] = {}
        for t in ("activation_traces", "requests", "probe_scores"):
            if t in ours:
                for tid, rid in self._rows(f"SELECT DISTINCT lower(hex(trace_id)), request_id FROM {self.db}.{t} "
                                           f"WHERE {cond}", params):
                    found[(tid, rid)] = None
        rep.requests = sorted(found)
        before: list[str] = []
        if (self.db, "forgotten") in have:
            # forgotten before: the traces whose spans went then stay forgotten (and swept)
            rep.previously_forgotten, before = self._previous(target)
        steps = [Step(f"{self.db}.{t}", cond, params) for t in ours]

        if target.selector == "trace_id":
            rep.whole_traces = [target.value]
            if spans:
                steps.append(Step(f"{self.odb}.{self.traces}", "TraceId = {tid:String}", params))
            if index:
                steps.append(Step(f"{self.odb}.{self.traces}_trace_id_ts", "TraceId = {tid:String}", params))
        else:
            traces = {tid for tid, _ in rep.requests if any(int(c, 16) for c in tid)}
            if spans:
                traces |= {r[0] for r in self._rows(
                    f"SELECT DISTINCT TraceId FROM {self.odb}.{self.traces} WHERE {_SPAN_RID}", params)}
            if whole_traces is None:
                whole_traces = [t for t in traces if not self._other_requests(t, target.value, ours, spans)] + before
            rep.whole_traces = sorted(set(whole_traces))
            wparams = params | {"whole": rep.whole_traces}
            if spans:
                steps.append(Step(f"{self.odb}.{self.traces}",
                                  f"({_SPAN_RID} OR TraceId IN {{whole:Array(String)}})", wparams))
            if index:
                steps.append(Step(f"{self.odb}.{self.traces}_trace_id_ts", "TraceId IN {whole:Array(String)}", wparams))
        for s in steps:
            s.rows = int(self._rows(f"SELECT count() FROM {s.table} WHERE {s.where}", s.params)[0][0])
            rep.counts[s.table] = s.rows
        return rep, steps

    def _other_requests(self, trace: str, rid: str, ours: list[str], spans: bool) -> bool:
        """Does the trace hold a request other than `rid` (stored rows, or spans naming another)?"""
        p = {"tid": trace, "rid": rid}
        for t in ours:
            if self._rows(f"SELECT count() FROM {self.db}.{t} WHERE trace_id = unhex({{tid:String}}) "
                          "AND request_id != {rid:String}", p)[0][0]:
                return True
        if spans:
            other = ("(SpanAttributes['rid'] NOT IN ('', {rid:String}) OR "
                     "SpanAttributes['tensortrace.request_id'] NOT IN ('', {rid:String}))")
            if self._rows(f"SELECT count() FROM {self.odb}.{self.traces} WHERE TraceId = {{tid:String}} AND {other}",
                          p)[0][0]:
                return True
        return False

    def _previous(self, target: Target) -> tuple[str, list[str]]:
        """When the id was last forgotten ('' if never) and the traces whose spans went with it."""
        rows = self._rows(f"SELECT max(forgotten_at), groupUniqArrayArray(whole_traces) FROM {self.db}.forgotten "
                          "WHERE selector = {s:String} AND value = {v:String} HAVING count() > 0",
                          {"s": target.selector, "v": target.value})
        if not rows or rows[0][0] is None:
            return "", []
        return rows[0][0].isoformat(), list(rows[0][1])

    # -- deleting --------------------------------------------------------------------------------

    def forget(self, target: Target, dry_run: bool = False) -> ForgetReport:
        """Delete everything `target` matches, record it in `forgotten`, log one audit line."""
        rep, steps = self.plan(target)
        rep.dry_run = dry_run
        if not dry_run:
            rep.deleted = self._delete(steps)
            if any(t == (self.db, "forgotten") for t in self._tables()):
                self.client.insert(f"{self.db}.forgotten",
                                   [[target.selector, target.value, rep.whole_traces,
                                     datetime.datetime.now(datetime.timezone.utc)]],
                                   column_names=["selector", "value", "whole_traces", "forgotten_at"])
                rep.recorded = True
        audit("forget", rep)
        return rep

    def _delete(self, steps: list[Step]) -> dict[str, int]:
        deleted = {}
        for s in steps:
            if s.rows:
                self.client.command(f"ALTER TABLE {s.table} DELETE WHERE {s.where}", parameters=s.params,
                                    settings={"mutations_sync": 2})
            deleted[s.table] = s.rows
        return deleted

    def sweep(self) -> list[ForgetReport]:
        """Delete again what was forgotten and has come back (a Kafka re-read re-inserted it).
        Returns a report per forgotten id that had rows again; each is logged as `forget_sweep`."""
        if (self.db, "forgotten") not in self._tables():
            return []
        out = []
        for selector, value, whole in self._rows(
                f"SELECT selector, value, whole_traces FROM {self.db}.forgotten FINAL ORDER BY forgotten_at"):
            rep, steps = self.plan(Target(selector, value), whole_traces=list(whole))
            if rep.total:
                rep.dry_run = False
                rep.deleted = self._delete(steps)
                audit("forget_sweep", rep)
                out.append(rep)
        return out


def audit(event: str, rep: ForgetReport) -> None:
    """One structured log line per forget (ids and per-table counts): the audit record."""
    log.warning(json.dumps({"event": event} | rep.as_dict(), sort_keys=True))


# -- the command line --------------------------------------------------------------------------------

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3
DEFAULT_DSN = "chdb:///var/lib/tensortrace/chdb"


def _redact(dsn: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", dsn)


def _print_report(rep: ForgetReport, out) -> None:
    verb = "would delete" if rep.dry_run else "deleted"
    print(f"{rep.target} at {rep.where}: " + (
        f"{len(rep.requests)} stored request(s): " + ", ".join(f"{r!r} (trace {t})" for t, r in rep.requests[:10])
        if rep.requests else "no stored request"), file=out)
    for table, n in rep.counts.items():
        print(f"  {table:<44} {n:>10} rows {verb if n else ''}", file=out)
    for table in rep.absent:
        print(f"  {table:<44} {'-':>10}      (no such table here)", file=out)
    if rep.previously_forgotten:
        print(f"  already forgotten at {rep.previously_forgotten}" + ("; nothing came back" if not rep.total else ""),
              file=out)
    print(f"  {verb} {rep.total} rows in {sum(1 for n in rep.counts.values() if n)} tables", file=out)


def parser():
    """The `tensortrace forget` arguments (query/forget.py adds --server and the client security
    flags to the same parser)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="tensortrace forget",
        description="Delete one request's tensors, summaries, probe scores and spans from every table "
                    "TensorTrace stores (docs/data-lifecycle.md). Exit codes: 0 forgotten (or already), "
                    "3 not found, 2 bad arguments, 1 ClickHouse error (or the query service refused).")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--trace-id", help="32 hex chars: every request under this trace, and all its spans")
    who.add_argument("--request-id", help="this request id, under every trace that has it")
    p.add_argument("--clickhouse", "--clickhouse-dsn", dest="dsns", action="append",
                   help=f"chdb:///path or http(s)://host:port (repeat for each ClickHouse holding TensorTrace or "
                        f"spans tables; credentials from CLICKHOUSE_USER/CLICKHOUSE_PASSWORD); default {DEFAULT_DSN}")
    p.add_argument("--database", default=DEFAULT_DATABASE, help="TensorTrace database (default %(default)s)")
    p.add_argument("--otel-database", default=DEFAULT_OTEL_DATABASE, help="spans database (default %(default)s)")
    p.add_argument("--traces-table", default=DEFAULT_TRACES_TABLE, help="spans table (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true", help="one JSON object per ClickHouse on stdout")
    return p


def parse_target(args) -> Target:
    """The target and the names, checked (ValueError naming the problem: exit 2)."""
    target = Target.parse(args.trace_id, args.request_id)
    for name, what in ((args.database, "database"), (args.otel_database, "database"), (args.traces_table, "table")):
        check_identifier(name, what)
    return target


def main(argv: list[str] | None = None) -> int:
    """`tensortrace forget` on ClickHouse directly (--clickhouse). Exit 0: forgotten (or forgotten
    before, nothing left); 3: no such id in any ClickHouse given; 2: bad arguments (a malformed id);
    1: ClickHouse failed or unreachable."""
    import sys

    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        target = parse_target(args)
    except ValueError as e:
        print(f"tensortrace forget: {e}", file=sys.stderr)
        return EXIT_USAGE
    return run(args, target)


def finish(reports: list[ForgetReport], target: Target, wheres: list[str], failed: bool, as_json: bool) -> int:
    """Print the reports; the exit code (main's)."""
    import sys

    found, recorded, empty = False, False, []
    for rep in reports:
        found = found or rep.found
        recorded = recorded or rep.recorded
        if not rep.counts:
            empty.append(rep.where)
        if as_json:
            print(json.dumps(rep.as_dict()))
        else:
            _print_report(rep, sys.stdout)
    if failed:
        return EXIT_ERROR
    if not found:
        print(f"tensortrace forget: no request, score or span with {target} in {', '.join(wheres)}"
              + ("; recorded as forgotten all the same, so the loader deletes it if it still arrives (within "
                 "the `forgotten` retention)" if recorded else "")
              + (f"; no TensorTrace or spans tables at all in {', '.join(empty)}: wrong --clickhouse or --database?"
                 if empty else ""), file=sys.stderr)
        return EXIT_NOT_FOUND
    return EXIT_OK


def run(args, target: Target) -> int:
    import sys

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from tensortrace.storage.schema import connect

    failed, reports = False, []
    dsns = args.dsns or [DEFAULT_DSN]
    for dsn in dsns:
        where = _redact(dsn)
        try:
            client = connect(dsn)
        except Exception as e:
            # chDB prints "Cannot lock file .../status" itself and raises "Error initializing EmbeddedServer"
            hint = (" (the path is held by a running process, e.g. the loader: forget through its query service, "
                    "--server HOST:PORT with a token of the forget role, or stop it)") if (
                "lock" in str(e).lower() or "EmbeddedServer" in str(e)) else ""
            print(f"tensortrace forget: cannot open ClickHouse {where}: {type(e).__name__}: {str(e)[:300]}{hint}",
                  file=sys.stderr)
            failed = True
            continue
        try:
            reports.append(Forgetter(client, args.database, args.otel_database, args.traces_table, where).forget(
                target, dry_run=args.dry_run))
        except Exception as e:
            print(f"tensortrace forget: {target} at {where} failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
            failed = True
            continue
        finally:
            client.close()
    return finish(reports, target, [_redact(d) for d in dsns], failed, args.json)
