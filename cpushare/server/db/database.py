"""
The databases the market's store runs on: SQLite and PostgreSQL.

A database is named by a URL:

    sqlite:///var/lib/cpushare/market.sqlite    a SQLite file (a path alone is one too)
    postgresql://cpushare@db.example.org/market  libpq's URL: every libpq setting works,
                                                 and PGPASSFILE, PGPASSWORD and the
                                                 other PG* variables fill in the rest

L{fromURL} gives a L{SQLite} or a L{PostgreSQL}; its C{connect()} gives a
L{Connection}.  Queries are written once, for both: C{?} placeholders
(turned into psycopg's C{%s} for PostgreSQL), C{INSERT ... RETURNING id}
for new ids, and schema files whose few differing types are named by
placeholders (L{SQLite.types}, L{PostgreSQL.types}).

A query function takes a cursor and runs inside one transaction
(L{Connection.transact}).  On SQLite that transaction holds the one write
lock from its start (C{BEGIN IMMEDIATE}).  On PostgreSQL it runs at
SERIALIZABLE isolation, so concurrent transactions behave as if they ran
one after another; one that conflicts with another is rolled back and the
function is run again from scratch, a bounded number of times.  A query
function must therefore do nothing but SQL through its cursor.

PostgreSQL is reached through psycopg 3, imported only when a PostgreSQL
database is used.
"""

import functools
import os
import random
import re
import sqlite3
import time


class BadURL(ValueError):
    """A database URL this market cannot use; the message says why."""


class Unavailable(Exception):
    """The database cannot be reached; the message names it (no password) and why."""


class ConnectionLost(Unavailable):
    """
    The connection broke during a transaction.  C{committing} is true when
    it broke while committing: then nobody knows whether the transaction
    took effect.
    """

    def __init__(self, message, committing):
        Unavailable.__init__(self, message)
        self.committing = committing


def oneLine(error):
    """An exception's message on one line (libpq's span several)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def masked(url):
    """C{url} with any password replaced by ***, for logs and messages."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url, flags=re.IGNORECASE)


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def fromURL(url):
    """
    The database C{url} names: C{sqlite:///ABSOLUTE/PATH}, C{sqlite:RELATIVE/PATH},
    a plain path (a SQLite file) or C{postgresql://...} (C{postgres://} too).
    Raises L{BadURL} naming the problem.
    """
    url = url.strip()
    if not url:
        raise BadURL("the database URL is empty")
    scheme = _SCHEME.match(url)
    if scheme is None or "://" not in url and scheme.group(1).lower() != "sqlite":
        return SQLite(url)
    name = scheme.group(1).lower()
    rest = url[scheme.end():]
    if name == "sqlite":
        if rest.startswith("//"):
            authority, _, path = rest[2:].partition("/")
            if authority:
                raise BadURL(
                    f"{url!r}: a SQLite URL names a file, not a host: write"
                    " sqlite:///absolute/path or sqlite:relative/path")
            path = "/" + path
        else:
            path = rest
        if path.strip("/") == "":
            raise BadURL(f"{url!r} names no SQLite file")
        return SQLite(path)
    if name in ("postgresql", "postgres"):
        return PostgreSQL(url)
    raise BadURL(
        f"{masked(url)!r}: the market's database is SQLite (sqlite:///PATH) or"
        f" PostgreSQL (postgresql://USER@HOST/DBNAME), not {name}")


class Cursor:
    """
    A DB-API cursor that takes C{?} placeholders on every database.  SQL
    executed without parameters is sent as it is (schema files, queries
    with no values).
    """

    __slots__ = ("database", "raw")

    def __init__(self, database, raw):
        self.database = database
        self.raw = raw

    def execute(self, sql, params=None):
        if params is None:
            self.raw.execute(sql)
        else:
            self.raw.execute(self.database.placeholders(sql), params)
        return self

    def fetchone(self):
        return self.raw.fetchone()

    def fetchall(self):
        return self.raw.fetchall()

    def __iter__(self):
        return iter(self.raw.fetchall())

    @property
    def rowcount(self):
        return self.raw.rowcount

    @property
    def description(self):
        return self.raw.description


class Connection:
    """
    One connection to a database.  C{transact} runs a query function in a
    transaction; C{execute} runs one statement on its own, committed at
    once (for tests and tools).  Use a connection from one thread at a time.
    """

    def __init__(self, database, raw):
        self.database = database
        self.raw = raw

    def __repr__(self):
        return f"<Connection to {self.database}>"

    def cursor(self):
        return Cursor(self.database, self.raw.cursor())

    def execute(self, sql, params=None):
        return self.cursor().execute(sql, params)

    @property
    def broken(self):
        """True once the connection is unusable (PostgreSQL's went away)."""
        return self.database.broken(self.raw)

    def close(self):
        try:
            self.raw.close()
        except Exception:
            pass

    def transact(self, fn, *args):
        """
        Call C{fn(cursor, *args)} in one transaction and commit it; roll it
        back if C{fn} raises.  A transaction that conflicted with another
        (PostgreSQL) is run again, C{fn} included, up to
        C{database.attempts} times in all.  Raises L{ConnectionLost} if the
        connection breaks.
        """
        database = self.database
        attempt = 0
        while True:
            attempt += 1
            cursor = self.cursor()
            committing = False
            try:
                cursor.execute(database.begin)
                result = fn(cursor, *args)
                committing = True
                cursor.execute("COMMIT")
                return result
            except BaseException as e:
                self._failed(e, committing)
                if attempt < database.attempts and database.retryable(e):
                    # Let the transaction that won finish first.
                    time.sleep(random.uniform(0, 0.002 * 2 ** min(attempt, 8)))
                    continue
                raise

    def transactMany(self, calls):
        """
        Group commit: run each C{fn(cursor, *args)} of C{calls} in one
        transaction, each inside a savepoint of its own, and commit once.
        A call that raises is rolled back to its savepoint alone; the others
        are kept.  Returns [(True, result) or (False, exception)] in order,
        once the commit is done; raises (and nothing is kept) if the
        transaction itself fails.  For databases that never run a
        transaction again (C{attempts} 1): a retry would run them all again.
        """
        cursor = self.cursor()
        outcomes = []
        committing = False
        try:
            cursor.execute(self.database.begin)
            for fn, args in calls:
                cursor.execute("SAVEPOINT call")
                try:
                    result = fn(cursor, *args)
                except Exception as e:
                    cursor.execute("ROLLBACK TO SAVEPOINT call")
                    cursor.execute("RELEASE SAVEPOINT call")
                    outcomes.append((False, e))
                else:
                    cursor.execute("RELEASE SAVEPOINT call")
                    outcomes.append((True, result))
            committing = True
            cursor.execute("COMMIT")
            return outcomes
        except BaseException as e:
            self._failed(e, committing)
            raise

    def _failed(self, error, committing):
        """A transaction failed: roll it back; ConnectionLost if the connection went."""
        self._rollback()
        if self.broken:
            raise ConnectionLost(
                f"lost the connection to the database {self.database}: {oneLine(error)}",
                committing) from error

    def _rollback(self):
        try:
            if self.database.inTransaction(self.raw):
                self.raw.cursor().execute("ROLLBACK")
        except Exception:
            pass  # the connection is gone: so is the transaction


class SQLite:
    """A SQLite database file: one connection, one writer at a time."""

    kind = "sqlite"
    # One thread keeps the one connection: SQLite allows one writer anyway.
    threads = 1
    attempts = 1
    begin = "BEGIN IMMEDIATE"
    # The column types that differ between databases, as schema placeholders.
    types = {
        "serial": "INTEGER PRIMARY KEY",   # an id the database assigns
        "float": "REAL",                   # a double
        "bigint": "INTEGER",               # 64 bits
    }

    def __init__(self, path):
        self.path = path
        self.url = "sqlite:///" + os.path.abspath(path).lstrip("/")

    def __str__(self):
        return self.url

    def __repr__(self):
        return f"<SQLite {self.path}>"

    def connect(self):
        try:
            raw = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            raw.execute("PRAGMA journal_mode=WAL")
            raw.execute("PRAGMA foreign_keys=ON")
            raw.execute("PRAGMA busy_timeout=10000")
        except sqlite3.Error as e:
            raise Unavailable(f"cannot open the database {self}: {oneLine(e)}") from e
        return Connection(self, raw)

    def check(self):
        """Raise L{Unavailable} if the database cannot be opened."""
        self.connect().close()

    def placeholders(self, sql):
        return sql

    def retryable(self, error):
        return False

    def broken(self, raw):
        return False

    def inTransaction(self, raw):
        return raw.in_transaction

    def lockSchema(self, cursor):
        """Keep other migrations out: BEGIN IMMEDIATE already does."""


class PostgreSQL:
    """
    A PostgreSQL database: several connections, each transaction
    SERIALIZABLE and run again when it conflicts with another.
    """

    kind = "postgresql"
    threads = 4
    attempts = 10
    begin = "BEGIN ISOLATION LEVEL SERIALIZABLE"
    types = {
        "serial": "INTEGER GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        "float": "DOUBLE PRECISION",
        "bigint": "BIGINT",
    }
    # serialization_failure, deadlock_detected: the transaction may succeed if run again.
    RETRYABLE = ("40001", "40P01")
    CONNECT_TIMEOUT = 10
    # pg_advisory_xact_lock key for schema migrations ("cpus" in ASCII).
    SCHEMA_LOCK = 0x63707573

    def __init__(self, url):
        import psycopg

        self.url = url
        try:
            settings = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as e:
            raise BadURL(f"{masked(url)!r} is not a PostgreSQL URL: {oneLine(e)}") from e
        self.options = {}
        if "connect_timeout" not in settings:
            self.options["connect_timeout"] = self.CONNECT_TIMEOUT
        if "application_name" not in settings:
            self.options["application_name"] = "cpushare"

    def __str__(self):
        return masked(self.url)

    def __repr__(self):
        return f"<PostgreSQL {self}>"

    def connect(self):
        import psycopg

        try:
            raw = psycopg.connect(self.url, autocommit=True, **self.options)
        except psycopg.Error as e:
            raise Unavailable(f"cannot connect to the database {self}: {oneLine(e)}") from e
        return Connection(self, raw)

    def check(self):
        """Raise L{Unavailable} if the database cannot be reached."""
        conn = self.connect()
        try:
            conn.execute("SELECT 1")
        except Exception as e:
            raise Unavailable(f"cannot use the database {self}: {oneLine(e)}") from e
        finally:
            conn.close()

    def placeholders(self, sql):
        return pyformat(sql)

    def retryable(self, error):
        return getattr(error, "sqlstate", None) in self.RETRYABLE

    def broken(self, raw):
        return raw.broken or raw.closed

    def inTransaction(self, raw):
        from psycopg.pq import TransactionStatus

        return raw.info.transaction_status != TransactionStatus.IDLE

    def lockSchema(self, cursor):
        """
        Keep other migrations out until this transaction ends.  Migrations
        run at READ COMMITTED: each statement after the lock sees what the
        migration before it committed, where a SERIALIZABLE snapshot would
        be older than the lock.  Must come first in the transaction.
        """
        cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        cursor.execute("SELECT pg_advisory_xact_lock(?)", (self.SCHEMA_LOCK,))


@functools.lru_cache(maxsize=1024)
def pyformat(sql):
    """
    A query with C{?} placeholders in psycopg's C{%s} style.  A C{?} inside
    a quoted string would be taken for a placeholder, so none may be there.
    """
    for quote in ("'", '"'):
        if any("?" in part for part in sql.split(quote)[1::2]):
            raise ValueError(f"a ? inside a quoted string in this SQL: {sql}")
    return sql.replace("%", "%%").replace("?", "%s")
