"""`tensortrace forget`, directly on ClickHouse or through the running loader's query service.

    tensortrace forget --request-id chatcmpl-42 --clickhouse http://user:pw@ch:8123      # storage/forget.py
    tensortrace forget --request-id chatcmpl-42 --server query.tensortrace:50052 \\
        --tls-ca ca.crt --token-file forget.token [--dry-run] [--json]

Why `--server`: with the embedded engine (chDB, the chart's default install) only one process can
open the data path, and that process is the loader. Forgetting with `--clickhouse chdb://...`
therefore needs the loader stopped; `--server` asks the loader's query service (the Forget RPC,
proto/tensortrace/v1/query.proto) to run the same Forgetter (storage/forget.py) in its own process,
on its own client and tables (its `--database`, `--query-otel-database`, `--query-traces-table`:
the table flags are the service's, so they are refused here, as `tensortrace trace --server` does).
The report and the exit codes are the same either way: 0 forgotten (or forgotten before, nothing
left), 3 nothing stored under the id, 2 bad arguments, 1 the service or ClickHouse failed, or the
service refused the call.

The connection takes the client security flags of `show` / `trace` (service/security.py:
`--tls-ca`, `--tls-cert/--tls-key`, `--tls-server-name`, `--token-file`, `--tls`, `--insecure`,
and the TENSORTRACE_* environment). Forget needs a token with the `forget` role: neither `read` nor
`control` implies it (docs/security.md). The service writes one audit line per call, with who, the
ids and the per-table counts.
"""

from __future__ import annotations

import sys

from tensortrace.storage import forget as storage_forget
from tensortrace.storage.forget import EXIT_ERROR, EXIT_OK, EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    from tensortrace.service.security import add_client_flags

    p = storage_forget.parser()
    p.add_argument("--server", help="forget through the query service at HOST:PORT (or grpc://HOST:PORT): the "
                                    "loader's --query-port, which holds an embedded engine's data path; needs a "
                                    "token with the forget role")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="--server: how long to wait for the service (the deletes rewrite data parts; default "
                        "%(default)s)")
    add_client_flags(p)   # --server: TLS, mTLS, token (docs/security.md)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        target = storage_forget.parse_target(args)
    except ValueError as e:
        return _err(str(e), EXIT_USAGE)
    if not args.server:
        return storage_forget.run(args, target)

    given = [flag for flag, value, default in (
        ("--clickhouse", args.dsns, None), ("--database", args.database, storage_forget.DEFAULT_DATABASE),
        ("--otel-database", args.otel_database, storage_forget.DEFAULT_OTEL_DATABASE),
        ("--traces-table", args.traces_table, storage_forget.DEFAULT_TRACES_TABLE)) if value != default]
    if given:
        return _err(f"{', '.join(given)}: with --server the query service forgets in the tables it was started "
                    "with; give either --server or --clickhouse", EXIT_USAGE)
    if args.timeout_s <= 0:
        return _err(f"--timeout-s {args.timeout_s}: must be > 0", EXIT_USAGE)
    return forget_remote(args, target)


def forget_remote(args, target) -> int:
    from tensortrace.query.errors import InvalidQuery, QueryError
    from tensortrace.query.remote import GrpcBackend
    from tensortrace.query.trace import server_address
    from tensortrace.service.security import SecurityError, client_security_from_args

    try:
        address = server_address(args.server)
        backend = GrpcBackend(address, security=client_security_from_args(args))
    except (ValueError, SecurityError) as e:   # SecurityError: a bad --tls-*/--token-file option
        return _err(str(e), EXIT_USAGE)
    try:
        kw = {target.selector: target.value}
        rep = backend.forget(**kw, dry_run=args.dry_run, timeout_s=args.timeout_s)
    except InvalidQuery as e:
        return _err(f"{target} through the query service at {address}: {e}", EXIT_USAGE)
    except QueryError as e:   # refused (which token / role to give), unreachable, ClickHouse failed
        return _err(f"{target} through the query service at {address}: {e}", EXIT_ERROR)
    finally:
        backend.close()
    rep.where = f"{rep.where or 'the ClickHouse'} (through the query service at {address})"
    return storage_forget.finish([rep], target, [rep.where], False, args.json)


def _err(text: str, code: int) -> int:
    print(f"tensortrace forget: {text}", file=sys.stderr)
    return code
