"""
Fixtures for every test: the databases the market's store runs on.

`db` is a fresh, empty database, once on SQLite and once on PostgreSQL
(tests that take it run twice); `conn` is a migrated connection to it.
`postgres` is the PostgreSQL server (test/postgres.py says which).
"""

import pytest

from cpushare.server import store
from cpushare.server.database import PostgreSQL, SQLite

from . import postgres as _postgres


@pytest.fixture(scope="session")
def postgres():
    try:
        server = _postgres.start()
    except _postgres.Missing as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.close()


@pytest.fixture
def postgresURL(postgres):
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    url = postgres.createDatabase()
    yield url
    postgres.dropDatabase(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A fresh, empty database: a L{SQLite} or a L{PostgreSQL}."""
    if request.param == "sqlite":
        return SQLite(str(tmp_path / "market.sqlite"))
    return PostgreSQL(request.getfixturevalue("postgresURL"))


@pytest.fixture
def conn(db):
    """A connection to C{db}, migrated: use it with C{store.transact(conn, fn)}."""
    c = db.connect()
    store.transact(c, store.migrate)
    yield c
    c.close()
