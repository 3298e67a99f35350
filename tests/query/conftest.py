import uuid

import pytest

from tensortrace.loader.schema import apply_migrations

_fallback = {}


def engine_client(request):
    """The shared `ch_client` fixture (tests/conftest.py) when present; else one chDB engine for this
    process (chDB allows one path per process, so never more than one)."""
    try:
        return request.getfixturevalue("ch_client")
    except pytest.FixtureLookupError:
        if "client" not in _fallback:
            import tempfile

            from tensortrace.loader.schema import connect

            _fallback["client"] = connect(f"chdb://{tempfile.mkdtemp(prefix='tt-query-tests-')}")
        return _fallback["client"]


@pytest.fixture
def tt_db(request):
    """(client, database): a fresh migrated database on the test engine, dropped afterwards."""
    client = engine_client(request)
    db = f"tt_{uuid.uuid4().hex[:12]}"
    apply_migrations(client, db)
    yield client, db
    client.command(f"DROP DATABASE IF EXISTS {db}")
