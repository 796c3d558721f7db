"""
The store's databases, SQLite and PostgreSQL, for real: URLs, placeholders,
the same schema on both, SERIALIZABLE transactions run again after a
conflict, lost connections, and the order of writes nobody waits for.
"""

import threading
import time

import psycopg
import pytest
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from cpushare.server import admin
from cpushare.server.db import database
from cpushare.server.db import store
from cpushare.server.db.database import BadURL, PostgreSQL, SQLite, Unavailable
from cpushare.server.db.store import Store

# -- URLs


@pytest.mark.parametrize("url, kind, shown", [
    ("sqlite:///var/lib/cpushare/market.sqlite", SQLite, "sqlite:///var/lib/cpushare/market.sqlite"),
    ("/var/lib/cpushare/market.sqlite", SQLite, "sqlite:///var/lib/cpushare/market.sqlite"),
    ("postgresql://cpushare@db.example.org/market", PostgreSQL,
     "postgresql://cpushare@db.example.org/market"),
    ("postgres://cpushare:s3cret@db.example.org:5433/market", PostgreSQL,
     "postgres://cpushare:***@db.example.org:5433/market"),
    ("postgresql://cpushare@db.example.org/market?sslmode=require&password=s3cret", PostgreSQL,
     "postgresql://cpushare@db.example.org/market?sslmode=require&password=***"),
])
def test_urls_name_a_database_and_never_show_its_password(url, kind, shown):
    db = database.fromURL(url)
    assert isinstance(db, kind)
    assert str(db) == shown
    assert "s3cret" not in repr(db)


def test_a_relative_sqlite_url_is_a_path_from_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = database.fromURL("sqlite:data/market.sqlite")
    assert db.path == "data/market.sqlite"
    assert str(db) == f"sqlite://{tmp_path}/data/market.sqlite"


@pytest.mark.parametrize("url, problem", [
    ("", "empty"),
    ("mysql://cpushare:s3cret@db/market", "not mysql"),
    ("sqlite://db.example.org/market.sqlite", "names a file, not a host"),
    ("sqlite://", "names no SQLite file"),
    ("postgresql://cpushare:s3cret@db/market?colour=blue", "is not a PostgreSQL URL"),
])
def test_bad_urls_are_refused_naming_the_problem(url, problem):
    with pytest.raises(BadURL, match=problem) as caught:
        database.fromURL(url)
    assert "s3cret" not in str(caught.value)


def test_an_unreachable_postgresql_is_named_with_the_reason_and_no_password():
    db = PostgreSQL("postgresql://cpushare:s3cret@127.0.0.1:1/market")
    with pytest.raises(Unavailable) as caught:
        db.check()
    message = str(caught.value)
    assert message.startswith(
        "cannot connect to the database postgresql://cpushare:***@127.0.0.1:1/market: ")
    assert "Connection refused" in message
    assert "s3cret" not in message and "\n" not in message


def test_an_sqlite_file_that_cannot_be_opened_is_named(tmp_path):
    db = SQLite(str(tmp_path / "missing" / "market.sqlite"))
    with pytest.raises(Unavailable, match=f"cannot open the database {db.url}: unable to open"):
        db.check()


@pytest.mark.parametrize("arguments, problem", [
    (["--db", "postgresql://cpushare:s3cret@127.0.0.1:1/market"],
     "cannot connect to the database postgresql://cpushare:***@127.0.0.1:1/market: "),
    (["--db", "mysql://cpushare:s3cret@db/market"], "--db: 'mysql://cpushare:***@db/market': "),
    (["--db", "sqlite:///nowhere/market.sqlite"], "no market database at /nowhere/market.sqlite"),
])
def test_the_admin_tool_names_a_database_it_cannot_use(arguments, problem, capsys):
    assert admin.main(arguments + ["accounts"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"cpushare-admin: {problem}") and err.count("\n") == 1, err
    assert "s3cret" not in err


def test_the_admin_tool_works_on_postgresql(postgresURL, capsys):
    conn = PostgreSQL(postgresURL).connect()
    store.transact(conn, store.migrate)
    store.transact(conn, store.createAccount, "alice", "ab" * 32)
    assert admin.main(["--db", postgresURL, "delete-account", "alice"]) == 0
    assert admin.main(["--db", postgresURL, "accounts"]) == 0
    assert "alice" in capsys.readouterr().out
    account, reason = store.transact(conn, store.accountForCertificate, "ab" * 32)
    assert account is None and "was deleted" in reason
    conn.close()


# -- queries written once


def test_placeholders_and_percent_signs_mean_the_same_on_both(conn):
    row = conn.execute("SELECT ? || '%', 100 % 7", ("5",)).fetchone()
    assert tuple(row) == ("5%", 2)
    assert tuple(conn.execute("SELECT '50%'").fetchone()) == ("50%",)


def test_a_question_mark_inside_a_string_is_refused_for_postgresql():
    with pytest.raises(ValueError, match="a \\? inside a quoted string"):
        database.pyformat("SELECT name FROM accounts WHERE name = 'who?' AND id = ?")
    assert database.pyformat("SELECT 'it''s' || ? || '%'") == "SELECT 'it''s' || %s || '%%'"


def test_new_ids_come_back_from_insert_returning(conn):
    first = store.transact(conn, store.createAccount, "alice", "ab" * 32)
    second = store.transact(conn, store.createAccount, "bob", "cd" * 32)
    assert second > first > 0
    image = "ee" * 32
    store.transact(conn, store.addAccountImage, first, image, 5 * 2**30, "big.iso")
    assert store.transact(conn, store.imageUsage, first) == 5 * 2**30
    orderId, vms = store.transact(conn, store.createOrder, first, image, 2, 1, 256)
    assert orderId > 0 and len(vms) == 2 and vms[1] > vms[0]
    rows = store.transact(conn, store.accountVMs, first)
    assert {r["vm"]: r["mac"] for r in rows} == {v: store.macFor(v) for v in vms}


# -- the same schema on both


def affinity(declared):
    """SQLite's type affinity of a declared column type."""
    declared = declared.upper()
    if "INT" in declared:
        return "integer"
    if any(t in declared for t in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if any(t in declared for t in ("REAL", "FLOA", "DOUB")):
        return "double"
    return declared


def sqliteSchema(conn):
    tables = {}
    names = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall()
    for (table,) in names:
        columns = conn.execute(f"PRAGMA table_info({table})").fetchall()
        tables[table] = [
            # A primary key is never NULL on PostgreSQL; SQLite says so only for integers.
            (name, affinity(declared), bool(notNull or pk), pk)
            for _, name, declared, notNull, _, pk in columns
        ]
    indexes = conn.execute(
        "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
    ).fetchall()
    return tables, {tuple(i) for i in indexes}


POSTGRES_TYPES = {"integer": "integer", "bigint": "integer", "text": "text",
                  "double precision": "double"}


def postgresSchema(conn):
    tables = {}
    rows = conn.execute(
        "SELECT c.table_name, c.column_name, c.data_type, c.is_nullable,"
        " COALESCE(k.ordinal_position, 0)"
        " FROM information_schema.columns c"
        " LEFT JOIN information_schema.table_constraints t"
        "  ON t.table_schema = c.table_schema AND t.table_name = c.table_name"
        "  AND t.constraint_type = 'PRIMARY KEY'"
        " LEFT JOIN information_schema.key_column_usage k"
        "  ON k.constraint_name = t.constraint_name AND k.table_schema = c.table_schema"
        "  AND k.column_name = c.column_name"
        " WHERE c.table_schema = current_schema()"
        " ORDER BY c.table_name, c.ordinal_position"
    ).fetchall()
    types = {}
    for table, name, dataType, nullable, pk in rows:
        tables.setdefault(table, []).append(
            (name, POSTGRES_TYPES.get(dataType, dataType), nullable == "NO", pk))
        types[table, name] = dataType
    indexes = conn.execute(
        "SELECT i.indexname, i.tablename FROM pg_indexes i WHERE i.schemaname = current_schema()"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
    ).fetchall()
    return tables, {tuple(i) for i in indexes}, types


def test_migrations_make_the_same_tables_on_both(tmp_path, postgresURL):
    lite = SQLite(str(tmp_path / "market.sqlite")).connect()
    pg = PostgreSQL(postgresURL).connect()
    every = [n for n, _, _ in store.migrations()]
    assert store.transact(lite, store.migrate) == every
    assert store.transact(pg, store.migrate) == every
    liteTables, liteIndexes = sqliteSchema(lite)
    pgTables, pgIndexes, pgTypes = postgresSchema(pg)
    assert pgTables == liteTables
    assert pgIndexes == liteIndexes
    assert "ledger_entries" in pgTables and "vms" in pgTables
    # PostgreSQL's REAL is a 4-byte float: times are doubles, sizes and money 64 bits.
    assert "real" not in pgTypes.values()
    assert pgTypes["vms", "started"] == "double precision"
    assert pgTypes["images", "size"] == "bigint"
    assert pgTypes["ledger_entries", "amount"] == "bigint"
    lite.close()
    pg.close()


def test_migrating_twice_at_once_applies_each_version_once(postgresURL):
    db = PostgreSQL(postgresURL)
    conns = [db.connect(), db.connect()]
    results = [None, None]

    def migrate(i):
        try:
            results[i] = store.transact(conns[i], store.migrate)
        except Exception as e:
            results[i] = [e]

    threads = [threading.Thread(target=migrate, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results, key=len) == [[], [n for n, _, _ in store.migrations()]]
    for c in conns:
        c.close()


# -- SERIALIZABLE transactions racing on PostgreSQL


def counter(url, attempts=None):
    db = PostgreSQL(url)
    if attempts is not None:
        db.attempts = attempts
    setup = db.connect()
    setup.execute("CREATE TABLE counter (n INTEGER NOT NULL)")
    setup.execute("INSERT INTO counter (n) VALUES (0)")
    return db, setup


def race(db):
    """
    Two transactions on two connections both read the counter, then both
    add one: they conflict.  Returns what each returned (or raised) and
    the values each attempt read.
    """
    bothRead = threading.Barrier(2, timeout=20)
    reads = []
    outcomes = [None, None]

    def increment(cursor, first):
        (n,) = cursor.execute("SELECT n FROM counter").fetchone()
        reads.append(n)
        if first:
            first.pop()
            bothRead.wait()
        cursor.execute("UPDATE counter SET n = ?", (n + 1,))
        return n + 1

    def worker(i):
        conn = db.connect()
        try:
            outcomes[i] = conn.transact(increment, [True])
        except Exception as e:
            outcomes[i] = e
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes, sorted(reads)


def test_a_transaction_that_conflicts_is_run_again_from_scratch(postgresURL):
    db, setup = counter(postgresURL)
    outcomes, reads = race(db)
    assert sorted(outcomes) == [1, 2]
    # Both first read 0; the one that lost read again, and saw the winner's 1.
    assert reads == [0, 0, 1]
    assert setup.execute("SELECT n FROM counter").fetchone()[0] == 2


def test_runs_again_are_bounded_and_the_conflict_reaches_the_caller(postgresURL):
    db, setup = counter(postgresURL, attempts=1)
    outcomes, reads = race(db)
    assert reads == [0, 0]
    [lost] = [o for o in outcomes if isinstance(o, Exception)]
    assert isinstance(lost, psycopg.errors.SerializationFailure)
    assert 1 in outcomes
    assert setup.execute("SELECT n FROM counter").fetchone()[0] == 1


# -- the store's pool


def appendRow(cursor, n):
    (position,) = cursor.execute("SELECT COUNT(*) FROM seen").fetchone()
    cursor.execute("INSERT INTO seen (n, position) VALUES (?, ?)", (n, position))


def seen(cursor):
    return [tuple(r) for r in cursor.execute("SELECT n, position FROM seen ORDER BY position")]


class StoreTests:
    """The store's pool on one database; subclasses say which."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.store = Store(reactor, self.database)
        self.store.startService()
        self.addCleanup(lambda: self.store.running and self.store.stopService())
        yield self.store.open()
        yield self.store.run(
            lambda c: c.execute("CREATE TABLE seen (n INTEGER NOT NULL, position INTEGER NOT NULL)"))

    @defer.inlineCallbacks
    def test_writes_nobody_waits_for_keep_their_place_among_the_other_calls(self):
        # Each runInOrder waits for the run before it; each run for the runInOrder before.
        calls = [(self.store.runInOrder if n % 2 else self.store.run)(appendRow, n)
                 for n in range(30)]
        calls.append(self.store.runInOrder(appendRow, 30))
        rows = yield self.store.run(seen)
        assert rows == [(n, n) for n in range(31)]
        yield defer.gatherResults(calls)

    @defer.inlineCallbacks
    def test_stopping_finishes_the_writes_made_before(self):
        for n in range(10):
            self.store.runInOrder(appendRow, n)
        yield self.store.stopService()
        conn = self.database.connect()
        try:
            assert store.transact(conn, seen) == [(n, n) for n in range(10)]
        finally:
            conn.close()
        with pytest.raises(Unavailable, match="is closed"):
            yield self.store.run(seen)

    @defer.inlineCallbacks
    def test_a_failed_write_does_not_stop_the_ones_after_it(self):
        def fail(cursor):
            cursor.execute("INSERT INTO seen (n, position) VALUES (NULL, NULL)")

        failed = self.store.runInOrder(fail)
        after = self.store.runInOrder(appendRow, 7)
        with pytest.raises(Exception, match="(?i)null"):
            yield failed
        yield after
        assert (yield self.store.run(seen)) == [(7, 0)]


class StoreOnSQLite(StoreTests, unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _database(self, tmp_path):
        self.database = SQLite(str(tmp_path / "market.sqlite"))


class StoreOnPostgreSQL(StoreTests, unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _database(self, postgresURL):
        self.database = PostgreSQL(postgresURL)

    @defer.inlineCallbacks
    def test_calls_run_side_by_side(self):
        other = threading.Event()

        def waitForOther(cursor):
            return other.wait(20)

        def releaseOther(cursor):
            other.set()

        first = self.store.run(waitForOther)
        yield self.store.run(releaseOther)
        assert (yield first) is True

    @defer.inlineCallbacks
    def test_a_lost_connection_is_logged_and_the_next_call_connects_again(self):
        def backend(cursor):
            return cursor.execute("SELECT pg_backend_pid()").fetchone()[0]

        first = yield self.store.run(backend)
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        other = self.database.connect()
        other.execute("SELECT pg_terminate_backend(?)", (first,))
        for _ in range(1000):  # until it is gone: terminating only signals it
            if not other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ?",
                                 (first,)).fetchall():
                break
            time.sleep(0.01)
        other.close()
        # The transaction had not begun when the connection was found
        # broken: it runs on a new connection, and the caller sees nothing.
        second = yield self.store.run(backend)
        assert second != first
        errors = [formatEvent(e) for e in logged if e.get("log_level").name == "error"]
        assert len(errors) == 1, errors
        assert errors[0].startswith(f"lost the connection to the database {self.database}: ")
        assert errors[0].endswith("running the transaction again on a new connection")
