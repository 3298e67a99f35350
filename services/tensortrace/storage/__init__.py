"""The ClickHouse contract, in one place: schema, migrations, identifier checks, `connect`, and the
thread-safe client that the loader's insert thread and the query service share.

    from tensortrace.storage import connect, apply_migrations, ThreadSafeClient
    client = ThreadSafeClient(connect("chdb:///tmp/tt"))
    apply_migrations(client, database="tensortrace", ttl_days=7)

Retention per table (TTL, checked at every start) is storage/retention.py; deleting one request
everywhere (`tensortrace forget`, and the loader's sweep that keeps it deleted) is storage/forget.py.

Every service that reads or writes ClickHouse (loader, query, and the bridge and probes to come)
imports this package; no service package imports another (tests/repo/test_repo_contracts.py checks it).
"""

from tensortrace.storage.client import ThreadSafeClient
from tensortrace.storage.schema import (ACTIVATION_COLUMNS, DEFAULT_DATABASE, DEFAULT_TTL_DAYS, IDENTITY_COLUMNS,
                                        REQUEST_COLUMNS, SCHEMA_VERSION, SchemaError, apply_migrations,
                                        check_identifier, connect)

__all__ = ["ACTIVATION_COLUMNS", "DEFAULT_DATABASE", "DEFAULT_TTL_DAYS", "IDENTITY_COLUMNS", "REQUEST_COLUMNS",
           "SCHEMA_VERSION", "SchemaError", "ThreadSafeClient", "apply_migrations", "check_identifier", "connect"]
