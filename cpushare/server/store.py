"""
The market's SQL store.

All SQL runs on a thread pool of the store's own, never on the reactor
thread: C{Store.run(fn, *args)} calls C{fn(cursor, *args)} inside one
transaction on that pool and returns a Deferred.  The functions in this
module that take a cursor are the queries; they run the same way from the
server (on the pool) and from C{cpushare-admin} (directly).

The schema is a list of numbered SQL files shipped with the package
(C{schema/NNN_name.sql}), applied in order and recorded in
C{schema_version}.  The files are written once for every database the
store supports; the few types that differ are named by placeholders that
C{migrate} fills in for the database at hand (see L{SQLITE_TYPES}).
"""

import datetime
import os
import re
import sqlite3
from importlib import resources

from twisted.application.service import Service
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()


class NameTaken(Exception):
    pass


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def migrations():
    """The schema files, as (version, name, sql), in order."""
    found = []
    for entry in resources.files("cpushare.server").joinpath("schema").iterdir():
        match = re.match(r"(\d+)_(\w+)\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


def connect(path):
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def transact(conn, fn, *args):
    """Run C{fn(cursor, *args)} in one transaction on C{conn}."""
    cursor = conn.cursor()
    cursor.execute("BEGIN IMMEDIATE")
    try:
        result = fn(cursor, *args)
    except BaseException:
        cursor.execute("ROLLBACK")
        raise
    cursor.execute("COMMIT")
    return result


# The column types that differ between databases, as schema placeholders.
SQLITE_TYPES = {
    "serial": "INTEGER PRIMARY KEY",   # an id the database assigns
    "float": "REAL",                   # a double
}


def migrate(cursor, types=SQLITE_TYPES):
    """Bring the schema up to date; returns the versions applied."""
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_version"
        " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied TEXT NOT NULL)"
    )
    cursor.execute("SELECT version FROM schema_version")
    done = {row[0] for row in cursor.fetchall()}
    applied = []
    for version, name, sql in migrations():
        if version in done:
            continue
        for statement in sql.format_map(types).split(";"):
            if statement.strip():
                cursor.execute(statement)
        cursor.execute(
            "INSERT INTO schema_version (version, name, applied) VALUES (?, ?, ?)",
            (version, name, now()),
        )
        applied.append(version)
    return applied


# -- accounts


def createAccount(cursor, name, fingerprint):
    cursor.execute("SELECT id FROM accounts WHERE name = ?", (name,))
    if cursor.fetchone() is not None:
        raise NameTaken(name)
    stamp = now()
    cursor.execute("INSERT INTO accounts (name, created) VALUES (?, ?)", (name, stamp))
    accountId = cursor.lastrowid
    cursor.execute(
        "INSERT INTO certificates (fingerprint, account_id, issued) VALUES (?, ?, ?)",
        (fingerprint, accountId, stamp),
    )
    return accountId


def accountForCertificate(cursor, fingerprint):
    """
    The live account a certificate belongs to, as a dict, or None with the
    reason as a string.
    """
    cursor.execute(
        "SELECT a.id, a.name, a.created, a.deleted, c.revoked"
        " FROM certificates c JOIN accounts a ON a.id = c.account_id"
        " WHERE c.fingerprint = ?",
        (fingerprint,),
    )
    row = cursor.fetchone()
    if row is None:
        return None, "the certificate is not registered to any account"
    accountId, name, created, deleted, revoked = row
    if deleted is not None:
        return None, f"account {name!r} was deleted on {deleted}"
    if revoked is not None:
        return None, f"the certificate of account {name!r} was revoked on {revoked}"
    return {"id": accountId, "name": name, "created": created}, None


def listAccounts(cursor):
    cursor.execute(
        "SELECT id, name, created, deleted FROM accounts ORDER BY id"
    )
    return [
        {"id": r[0], "name": r[1], "created": r[2], "deleted": r[3]}
        for r in cursor.fetchall()
    ]


def deleteAccount(cursor, name):
    """Mark an account deleted; its certificates stop working.  Its name stays taken."""
    cursor.execute(
        "UPDATE accounts SET deleted = ? WHERE name = ? AND deleted IS NULL",
        (now(), name),
    )
    return cursor.rowcount == 1


class Store(Service):
    """The SQL store as a service: opens and migrates the database at start."""

    def __init__(self, reactor, path):
        self.reactor = reactor
        self.path = path
        self.pool = ThreadPool(1, 1, name="cpushare-store")
        self._conn = None

    def startService(self):
        # SQLite allows one writer; one thread keeps one connection.
        self.pool.start()
        Service.startService(self)

    def stopService(self):
        Service.stopService(self)
        d = deferToThreadPool(self.reactor, self.pool, self._close)
        d.addBoth(lambda result: self.pool.stop() or result)
        return d

    def _close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _call(self, fn, args):
        if self._conn is None:
            self._conn = connect(self.path)
        return transact(self._conn, fn, *args)

    def run(self, fn, *args):
        return deferToThreadPool(self.reactor, self.pool, self._call, fn, args)

    def open(self):
        """Create or migrate the database; fires when it is ready."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        d = self.run(migrate)

        def report(applied):
            if applied:
                log.info("database {path}: applied schema versions {versions}",
                         path=self.path, versions=applied)
            return applied

        return d.addCallback(report)


# -- images


def accountImages(cursor, accountId):
    cursor.execute(
        "SELECT ai.sha256, ai.name, i.size, ai.uploaded"
        " FROM account_images ai JOIN images i ON i.sha256 = ai.sha256"
        " WHERE ai.account_id = ? ORDER BY ai.uploaded, ai.sha256",
        (accountId,),
    )
    return [
        {"sha256": r[0], "name": r[1], "size": r[2], "uploaded": r[3]}
        for r in cursor.fetchall()
    ]


def imageUsage(cursor, accountId):
    """The bytes of images the account holds."""
    cursor.execute(
        "SELECT COALESCE(SUM(i.size), 0) FROM account_images ai"
        " JOIN images i ON i.sha256 = ai.sha256 WHERE ai.account_id = ?",
        (accountId,),
    )
    return cursor.fetchone()[0]


def accountHasImage(cursor, accountId, sha256):
    cursor.execute(
        "SELECT 1 FROM account_images WHERE account_id = ? AND sha256 = ?",
        (accountId, sha256),
    )
    return cursor.fetchone() is not None


def addAccountImage(cursor, accountId, sha256, size, name):
    stamp = now()
    cursor.execute("SELECT size FROM images WHERE sha256 = ?", (sha256,))
    row = cursor.fetchone()
    if row is None:
        cursor.execute(
            "INSERT INTO images (sha256, size, stored) VALUES (?, ?, ?)",
            (sha256, size, stamp),
        )
    cursor.execute(
        "INSERT INTO account_images (account_id, sha256, name, uploaded)"
        " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (accountId, sha256, name, stamp),
    )


# -- orders and VMs


def imageSize(cursor, accountId, sha256):
    """The size of an image the account holds, or None."""
    cursor.execute(
        "SELECT i.size FROM account_images ai JOIN images i ON i.sha256 = ai.sha256"
        " WHERE ai.account_id = ? AND ai.sha256 = ?",
        (accountId, sha256),
    )
    row = cursor.fetchone()
    return None if row is None else row[0]


def createOrder(cursor, accountId, image, vms, cores, memory):
    """Create an order and its VMs; returns (order id, [vm ids])."""
    stamp = now()
    cursor.execute(
        "INSERT INTO orders (account_id, image, vms, cores, memory, state, created)"
        " VALUES (?, ?, ?, ?, ?, 'open', ?)",
        (accountId, image, vms, cores, memory, stamp),
    )
    orderId = cursor.lastrowid
    ids = []
    for _ in range(vms):
        cursor.execute(
            "INSERT INTO vms (order_id, mac, state, created) VALUES (?, '', 'pending', ?)",
            (orderId, stamp),
        )
        vmId = cursor.lastrowid
        cursor.execute("UPDATE vms SET mac = ? WHERE id = ?", (macFor(vmId), vmId))
        ids.append(vmId)
    return orderId, ids


def macFor(vmId):
    """A locally administered unicast MAC, unique per VM id."""
    b = vmId.to_bytes(4, "big")
    return "0a:cb:" + ":".join(f"{x:02x}" for x in b)


def updateVM(cursor, vmId, **fields):
    names = sorted(fields)
    cursor.execute(
        "UPDATE vms SET " + ", ".join(f"{n} = ?" for n in names) + " WHERE id = ?",
        [fields[n] for n in names] + [vmId],
    )


def orderAccount(cursor, orderId):
    """The account id that placed an order, or None."""
    cursor.execute("SELECT account_id FROM orders WHERE id = ?", (orderId,))
    row = cursor.fetchone()
    return None if row is None else row[0]


def closeOrder(cursor, orderId, state):
    cursor.execute("UPDATE orders SET state = ? WHERE id = ?", (state, orderId))


ACTIVE_STATES = ("pending", "allocated", "fetching", "booting", "running", "detached")


def activeVMs(cursor):
    """VMs that were not over when the server last stopped, with their orders."""
    cursor.execute(
        "SELECT v.id, v.order_id, v.seller_account_id, v.mac, v.state, v.started,"
        " v.cpu_seconds, v.ip, o.account_id, o.image, o.cores, o.memory, i.size,"
        " a.name, s.name"
        " FROM vms v JOIN orders o ON o.id = v.order_id"
        " JOIN images i ON i.sha256 = o.image"
        " JOIN accounts a ON a.id = o.account_id"
        " LEFT JOIN accounts s ON s.id = v.seller_account_id"
        " WHERE v.state IN (" + ",".join("?" * len(ACTIVE_STATES)) + ")"
        " ORDER BY v.id",
        ACTIVE_STATES,
    )
    return cursor.fetchall()


def accountVMs(cursor, accountId, limit=1000):
    cursor.execute(
        "SELECT v.id, v.order_id, s.name, v.state, v.mac, v.ip, o.cores, o.memory,"
        " v.started, v.ended, v.cpu_seconds, v.reason"
        " FROM vms v JOIN orders o ON o.id = v.order_id"
        " LEFT JOIN accounts s ON s.id = v.seller_account_id"
        " WHERE o.account_id = ? ORDER BY v.id DESC LIMIT ?",
        (accountId, limit),
    )
    keys = ("vm", "order", "seller", "state", "mac", "ip", "cores", "memory",
            "started", "ended", "cpu_seconds", "reason")
    return [dict(zip(keys, row)) for row in cursor.fetchall()]
