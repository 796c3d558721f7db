"""
Fixtures for every test: the databases the market's store runs on.

`db` is a fresh, empty database, once on SQLite and once on PostgreSQL
(tests that take it run twice); `conn` is a migrated connection to it.
`postgres` is the PostgreSQL server (test/postgres.py says which).
"""

import os as _os

import pytest

from cpushare.server.db import store
from cpushare.server.db.database import PostgreSQL, SQLite

from . import postgres as _postgres


_HERE = _os.path.dirname(_os.path.abspath(__file__))
_VM_TESTS = _os.path.join(_HERE, "vm") + _os.sep
_BROWSER_TESTS = _os.path.join(_HERE, "browser") + _os.sep


def pytest_collection_modifyitems(config, items):
    """
    Tests that boot QEMU (test/vm), need PostgreSQL (a server of their own)
    or a browser (headless Chromium) are slow; `make check` leaves them out.

    When the tests run in several processes (`make test` runs two, with
    pytest-xdist), the tests that boot QEMU or drive the browser all run in
    one of them, one after the other: at most two VMs run at once, and the
    browser tests' screenshots are not written twice at the same time.  The
    other process runs everything else beside them.
    """
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        fixtures = getattr(item, "fixturenames", ())
        path = str(item.path)
        heavy = path.startswith((_VM_TESTS, _BROWSER_TESTS))
        if "postgres" in fixtures or "postgresql" in params.values() \
                or "browser" in fixtures or heavy:
            item.add_marker(pytest.mark.slow)
        if heavy:
            item.add_marker(pytest.mark.xdist_group("vm"))


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


# Deprecation warnings our own code causes fail the test that causes them.
# A library's warning is often attributed (stacklevel) to the library itself,
# as pyOpenSSL's are, so -W filters on the module cannot see who called it:
# this walks the stack from the attributed frame up past the library's own
# frames, and raises the warning as an error when the caller is cpushare/.

import os as _os
import sys as _sys
import warnings as _warnings

import cpushare as _cpushare

_OURS = _os.path.dirname(_os.path.abspath(_cpushare.__file__)) + _os.sep


def _package(path):
    """The directory that names the package a source file belongs to."""
    path = _os.path.abspath(path)
    if path.startswith(_OURS):
        return _OURS
    parts = path.split(_os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return _os.sep.join(parts[:parts.index(marker) + 2])
    return _os.path.dirname(path)


def _causedByUs(filename, lineno):
    frame = _sys._getframe(2)
    while frame is not None and not (
            frame.f_code.co_filename == filename and frame.f_lineno == lineno):
        frame = frame.f_back
    if frame is None:
        return _os.path.abspath(filename).startswith(_OURS)
    library = _package(filename)
    while frame is not None and _package(frame.f_code.co_filename) == library:
        if library == _OURS:
            return True
        frame = frame.f_back
    return frame is not None and _package(frame.f_code.co_filename) == _OURS


@pytest.fixture(autouse=True)
def _deprecationsOfOursAreErrors(monkeypatch):
    forward = _warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecationWarning) and _causedByUs(filename, lineno):
            if not isinstance(message, Warning):
                message = category(message)
            raise message
        forward(message, category, filename, lineno, file, line)

    monkeypatch.setattr(_warnings, "showwarning", showwarning)
