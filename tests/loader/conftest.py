import pytest

from tensortrace.storage.schema import apply_migrations


@pytest.fixture
def tt_db(ch_client, ch_database):
    """(client, database): this test's own database (tests/conftest.py), migrated to the loader schema."""
    apply_migrations(ch_client, ch_database)
    return ch_client, ch_database
