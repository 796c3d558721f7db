"""
The market's SQL store.

All SQL runs on a thread pool of the store's own, never on the reactor
thread: C{Store.run(fn, *args)} calls C{fn(cursor, *args)} inside one
transaction on that pool and returns a Deferred.  The functions in this
module that take a cursor are the queries; they run the same way from the
server (on the pool) and from C{cpushare-admin} (directly, through
L{transact}).

The store runs on SQLite or PostgreSQL (L{cpushare.server.db.database}): the
queries are written once, with C{?} placeholders and C{INSERT ... RETURNING
id}.  On PostgreSQL a query function may be run more than once (a
transaction that conflicted with another is run again), so it must do
nothing but SQL through its cursor.

The schema is a list of numbered SQL files shipped with the package
(C{schema/NNN_name.sql}), applied in order and recorded in
C{schema_version}.  The files are written once for every database the
store supports; the few types that differ are named by placeholders that
C{migrate} fills in for the database at hand: C{{serial}} (an id the
database assigns: the primary key column), C{{float}} (a double, for epoch
times) and C{{bigint}} (64-bit integers such as byte counts).
"""

import datetime
import os
import re
import threading
from importlib import resources

import attr

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from cpushare.protocol import states
from cpushare.server.db import database as databases
from cpushare.server.db.database import ConnectionLost, SQLite, Unavailable

log = Logger()

# The most calls one group commit takes.
GROUP_MAX = 256


class NameTaken(Exception):
    pass


class KeyTaken(Exception):
    """A public key that already belongs to a certificate of some account."""


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def migrations():
    """The schema files, as (version, name, sql), in order."""
    found = []
    for entry in resources.files("cpushare.server.db").joinpath("schema").iterdir():
        match = re.match(r"(\d+)_(\w+)\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


def connect(url):
    """
    A L{databases.Connection} to the database C{url} names (a plain path is
    a SQLite file).  Raises L{Unavailable} when it cannot be reached.
    """
    return databases.fromURL(url).connect()


def transact(conn, fn, *args):
    """Run C{fn(cursor, *args)} in one transaction on C{conn}."""
    return conn.transact(fn, *args)


SQLITE_TYPES = SQLite.types


def migrate(cursor, types=None):
    """Bring the schema up to date; returns the versions applied."""
    cursor.database.lockSchema(cursor)
    if types is None:
        types = cursor.database.types
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
            # PostgreSQL refuses a statement that is only a comment.
            if re.sub(r"--[^\n]*", "", statement).strip():
                cursor.execute(statement)
        cursor.execute(
            "INSERT INTO schema_version (version, name, applied) VALUES (?, ?, ?)",
            (version, name, now()),
        )
        applied.append(version)
    return applied


# -- accounts


def createAccount(cursor, name, fingerprint, publicKey=None, serial=None):
    """
    A new account holding one certificate; raises L{NameTaken} for a name
    in use (or once used) and L{KeyTaken} for a public key another
    certificate already has.
    """
    cursor.execute("SELECT id FROM accounts WHERE name = ?", (name,))
    if cursor.fetchone() is not None:
        raise NameTaken(name)
    _checkKeyFree(cursor, publicKey)
    stamp = now()
    cursor.execute(
        "INSERT INTO accounts (name, created) VALUES (?, ?) RETURNING id", (name, stamp))
    accountId = cursor.fetchone()[0]
    cursor.execute(
        "INSERT INTO certificates (fingerprint, account_id, issued, public_key, serial)"
        " VALUES (?, ?, ?, ?, ?)",
        (fingerprint, accountId, stamp, publicKey, serial),
    )
    return accountId


def _checkKeyFree(cursor, publicKey):
    if publicKey is None:
        return
    cursor.execute("SELECT 1 FROM certificates WHERE public_key = ?", (publicKey,))
    if cursor.fetchone() is not None:
        raise KeyTaken(publicKey)


@attr.s(frozen=True, slots=True)
class Account:
    """A live account, as a connection that authenticated knows it."""

    id: int = attr.ib()
    name: str = attr.ib()
    created: float = attr.ib()


def accountForCertificate(cursor, fingerprint):
    """
    The live account a certificate belongs to, as an L{Account}, or None with the
    reason as a string.

    The first use of a certificate that C{cpushare rekey} issued revokes
    the one it replaces: the client has stored the new one.
    """
    cursor.execute(
        "SELECT a.id, a.name, a.created, a.deleted, c.revoked, a.suspended,"
        " a.suspended_reason, c.replaces"
        " FROM certificates c JOIN accounts a ON a.id = c.account_id"
        " WHERE c.fingerprint = ?",
        (fingerprint,),
    )
    row = cursor.fetchone()
    if row is None:
        return None, "the certificate is not registered to any account"
    accountId, name, created, deleted, revoked, suspended, why, replaces = row
    if deleted is not None:
        return None, f"account {name!r} was deleted on {deleted}"
    if revoked is not None:
        return None, f"the certificate of account {name!r} was revoked on {revoked}"
    if suspended is not None:
        return None, f"account {name!r} is suspended since {suspended}" + (
            f": {why}" if why else "")
    if replaces is not None:
        cursor.execute("UPDATE certificates SET replaces = NULL WHERE fingerprint = ?",
                       (fingerprint,))
        revokeCertificate(cursor, accountId, replaces, "replaced by a new certificate")
    return Account(accountId, name, created), None


def listAccounts(cursor, after=0, limit=None):
    """The accounts in order of id, those after id C{after}, at most C{limit} when given."""
    cursor.execute(
        "SELECT id, name, created, deleted, suspended FROM accounts WHERE id > ? ORDER BY id"
        + ("" if limit is None else f" LIMIT {int(limit)}"), (after,)
    )
    return [
        {"id": r[0], "name": r[1], "created": r[2], "deleted": r[3], "suspended": r[4]}
        for r in cursor.fetchall()
    ]


def deleteAccount(cursor, name):
    """Mark an account deleted; its certificates stop working.  Its name stays taken."""
    stamp = now()
    cursor.execute(
        "UPDATE accounts SET deleted = ? WHERE name = ? AND deleted IS NULL", (stamp, name))
    if cursor.rowcount != 1:
        return False
    _accessChanged(cursor, _accountId(cursor, name), None, "deleted", stamp)
    return True


def _accountId(cursor, name):
    cursor.execute("SELECT id FROM accounts WHERE name = ?", (name,))
    row = cursor.fetchone()
    return None if row is None else row[0]


def _accessChanged(cursor, accountId, fingerprint, what, stamp=None):
    """Record a change of access for the running server to act on (L{accessChanges})."""
    cursor.execute(
        "INSERT INTO access_changes (account_id, fingerprint, what, created)"
        " VALUES (?, ?, ?, ?)", (accountId, fingerprint, what, stamp or now()))


def _changeAccess(cursor, sql, params, stamp, accountId, fingerprint, what):
    """
    Run the one-row update C{sql}; when it changed a row, note the change
    of access (C{accountId} may be a callable of the cursor) and say so.
    """
    cursor.execute(sql, params)
    if cursor.rowcount != 1:
        return False
    if callable(accountId):
        accountId = accountId(cursor)
    _accessChanged(cursor, accountId, fingerprint, what, stamp)
    return True


# The most characters a suspension's reason may have.
MAX_SUSPEND_REASON = 200


def suspendAccount(cursor, name, reason=None):
    """Suspend an active account: its connections close, its certificates are refused."""
    stamp = now()
    return _changeAccess(
        cursor, "UPDATE accounts SET suspended = ?, suspended_reason = ?"
        " WHERE name = ? AND deleted IS NULL AND suspended IS NULL", (stamp, reason, name),
        stamp, lambda c: _accountId(c, name), None,
        "suspended" + (f": {reason}" if reason else ""))


def unsuspendAccount(cursor, name):
    cursor.execute(
        "UPDATE accounts SET suspended = NULL, suspended_reason = NULL"
        " WHERE name = ? AND deleted IS NULL AND suspended IS NOT NULL", (name,))
    return cursor.rowcount == 1


def revokeCertificate(cursor, accountId, fingerprint, why="revoked"):
    """Revoke one live certificate; returns whether it was live."""
    stamp = now()
    return _changeAccess(
        cursor, "UPDATE certificates SET revoked = ? WHERE fingerprint = ? AND account_id = ?"
        " AND revoked IS NULL", (stamp, fingerprint, accountId),
        stamp, accountId, fingerprint, why)


class RekeyRefused(Exception):
    """A rekey the market will not do; the message says why."""


def addReplacement(cursor, accountId, current, fingerprint, publicKey, serial, perDay):
    """
    Store a certificate that replaces the live certificate C{current} of the
    account (L{accountForCertificate} revokes C{current} at its first use).
    A replacement issued earlier and never used is revoked.  At most
    C{perDay} certificates are issued to one account in 24 hours.
    """
    cursor.execute(
        "SELECT revoked FROM certificates WHERE fingerprint = ? AND account_id = ?",
        (current, accountId))
    row = cursor.fetchone()
    if row is None or row[0] is not None:
        raise RekeyRefused("this connection's certificate is no longer valid")
    since = (datetime.datetime.now(datetime.timezone.utc)
             - datetime.timedelta(days=1)).isoformat(timespec="seconds")
    cursor.execute(
        "SELECT COUNT(*) FROM certificates WHERE account_id = ? AND issued > ?",
        (accountId, since))
    if cursor.fetchone()[0] >= perDay:
        raise RekeyRefused(
            f"rekey refused: at most {perDay} certificates a day for one account")
    _checkKeyFree(cursor, publicKey)
    cursor.execute(
        "SELECT fingerprint FROM certificates WHERE replaces = ? AND revoked IS NULL",
        (current,))
    for (pending,) in cursor.fetchall():
        revokeCertificate(cursor, accountId, pending, "replaced by a newer rekey")
    cursor.execute(
        "INSERT INTO certificates (fingerprint, account_id, issued, public_key, serial,"
        " replaces) VALUES (?, ?, ?, ?, ?, ?)",
        (fingerprint, accountId, now(), publicKey, serial, current))


def normalSerial(text):
    """A serial number as stored: lower-case hex without colons or leading zeros."""
    return text.strip().lower().replace(":", "").lstrip("0") or "0"


def revoke(cursor, what):
    """
    Revoke the live certificates C{what} names: an account name (all of its
    certificates), a serial number (hex) or a SHA-256 fingerprint.  Returns
    [(account name, fingerprint, serial)] revoked; raises LookupError when
    C{what} names nothing live.
    """
    cursor.execute(
        "SELECT a.id, a.name, c.fingerprint, c.serial FROM certificates c"
        " JOIN accounts a ON a.id = c.account_id WHERE a.name = ? AND c.revoked IS NULL",
        (what,))
    rows = cursor.fetchall()
    if not rows and re.fullmatch(r"[0-9a-fA-F:]{1,128}", what.strip()):
        key = what.strip().lower().replace(":", "")
        cursor.execute(
            "SELECT a.id, a.name, c.fingerprint, c.serial FROM certificates c"
            " JOIN accounts a ON a.id = c.account_id"
            " WHERE (c.serial = ? OR c.fingerprint = ?) AND c.revoked IS NULL",
            (normalSerial(what), key))
        rows = cursor.fetchall()
    if not rows:
        raise LookupError(
            f"{what!r} names no live certificate: give an account name, a certificate's "
            "serial number or its SHA-256 fingerprint (see 'cpushare-admin certificates')")
    done = []
    for accountId, name, fingerprint, serial in rows:
        if revokeCertificate(cursor, accountId, fingerprint):
            done.append((name, fingerprint, serial))
    return done


def listCertificates(cursor, name=None):
    cursor.execute(
        "SELECT a.name, c.serial, c.fingerprint, c.issued, c.revoked FROM certificates c"
        " JOIN accounts a ON a.id = c.account_id"
        + (" WHERE a.name = ?" if name else "") + " ORDER BY a.name, c.issued",
        (name,) if name else ())
    return [dict(zip(("account", "serial", "fingerprint", "issued", "revoked"), r))
            for r in cursor.fetchall()]


def lastAccessChange(cursor):
    cursor.execute("SELECT COALESCE(MAX(id), 0) FROM access_changes")
    return cursor.fetchone()[0]


def accessChanges(cursor, after, limit=1000):
    """The changes of access recorded after id C{after}: [(id, account id, fingerprint, what)]."""
    cursor.execute(
        "SELECT id, account_id, fingerprint, what FROM access_changes WHERE id > ?"
        " ORDER BY id LIMIT ?", (after, limit))
    return [tuple(r) for r in cursor.fetchall()]


def revokedCertificates(cursor):
    """
    The certificates with a serial number that no longer work, for the
    revocation list: [(serial hex, revoked, account deleted, issued)], the
    times as stored (revoked is None for a certificate of a deleted account
    that was never revoked itself).
    """
    cursor.execute(
        "SELECT c.serial, c.revoked, a.deleted, c.issued FROM certificates c"
        " JOIN accounts a ON a.id = c.account_id"
        " WHERE c.serial IS NOT NULL AND (c.revoked IS NOT NULL OR a.deleted IS NOT NULL)"
        " ORDER BY c.issued, c.serial")
    return [tuple(r) for r in cursor.fetchall()]


class Store(Service):
    """
    The SQL store as a service: opens and migrates the database at start and
    runs query functions on a thread pool of its own.

    On PostgreSQL the pool has several threads, each call taking a
    connection of its own, so calls made with L{run} may run at the same
    time (SERIALIZABLE keeps them apart); SQLite has one thread and one
    connection.  Writes the caller does not wait for go through
    L{runInOrder}, which keeps the order calls were made in: such a write
    starts once every call made before it is done, and every call made
    after it starts once it is done (so it sees it).

    A connection that breaks is dropped, with an error in the log, and the
    next call connects again; a transaction that had not reached its commit
    is run again on the new connection.
    """

    def __init__(self, reactor, database, threads=None):
        """
        @param database: a L{SQLite} or L{databases.PostgreSQL}, or a URL
            or SQLite path naming one.
        """
        self.reactor = reactor
        if isinstance(database, str):
            database = databases.fromURL(database)
        self.database = database
        self.pool = ThreadPool(1, threads or database.threads, name="cpushare-store")
        self._lock = threading.Lock()
        self._idle = []
        self._ordered = defer.succeed(None)
        # Group commit (SQLite): calls queued while a transaction runs are
        # run together in the next one, each in a savepoint of its own.
        self.groupCommit = self.database.attempts == 1 and self.pool.max == 1
        self._batch = []
        self._draining = False
        self.batches = 0            # group commits made, for tests and benchmarks
        self._orderedPending = 0
        self._inFlight = set()

    def startService(self):
        self.pool.start()
        Service.startService(self)

    def stopService(self):
        Service.stopService(self)
        # The writes made so far are done first; nothing is lost.
        d = self._afterOrdered()
        d.addCallback(lambda _: self._stopPool())
        return d

    def _stopPool(self):
        self.pool.stop()
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- on the pool's threads

    def _connection(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            return self.database.connect()
        except Unavailable as e:
            self.reactor.callFromThread(log.error, "{why}", why=str(e))
            raise

    def _release(self, conn):
        if conn.broken:
            conn.close()
            return
        with self._lock:
            self._idle.append(conn)

    def _call(self, fn, args):
        retried = False
        while True:
            conn = self._connection()
            try:
                result = conn.transact(fn, *args)
            except ConnectionLost as e:
                conn.close()
                # The database went away, or this connection's server did:
                # the idle connections are likely gone too.
                with self._lock:
                    idle, self._idle = self._idle, []
                for other in idle:
                    other.close()
                again = not e.committing and not retried
                self.reactor.callFromThread(
                    log.error, "{why}; {then}", why=str(e),
                    then="running the transaction again on a new connection" if again
                    else "the transaction may or may not have been committed; the next"
                    " call connects again" if e.committing
                    else "the next call connects again")
                if not again:
                    raise
                retried = True
                continue
            except BaseException:
                self._release(conn)
                raise
            self._release(conn)
            return result

    # -- on the reactor's thread

    def _submit(self, fn, args):
        if self.pool.joined:
            return defer.fail(Unavailable(f"the store of {self.database} is closed"))
        if not self.groupCommit:
            return deferToThreadPool(self.reactor, self.pool, self._call, fn, args)
        d = defer.Deferred()
        with self._lock:
            self._batch.append((fn, args, d))
            start = not self._draining
            self._draining = True
        if start:
            self.pool.callInThread(self._drain)
        return d

    def _drain(self):
        """On the pool's thread: run the queued calls, a batch per transaction."""
        while True:
            with self._lock:
                if not self._batch:
                    self._draining = False
                    return
                batch, self._batch = self._batch[:GROUP_MAX], self._batch[GROUP_MAX:]
                self.batches += 1
            try:
                conn = self._connection()
                try:
                    outcomes = conn.transactMany([(fn, args) for fn, args, _ in batch])
                finally:
                    if conn.broken:
                        conn.close()
                    else:
                        self._release(conn)
            except BaseException as e:
                failure = Failure(e)
                outcomes = [(False, failure)] * len(batch)
            for (_, _, d), (ok, value) in zip(batch, outcomes):
                if ok:
                    self.reactor.callFromThread(d.callback, value)
                else:
                    self.reactor.callFromThread(
                        d.errback, value if isinstance(value, Failure) else Failure(value))

    def _afterOrdered(self):
        """A Deferred firing once the L{runInOrder} calls made so far are done."""
        barrier = defer.Deferred()
        self._ordered.addCallback(lambda _: barrier.callback(None))
        return barrier

    def run(self, fn, *args):
        """
        Call C{fn(cursor, *args)} in a transaction of its own on the pool;
        the Deferred fires with its result.  It starts after the
        L{runInOrder} calls made before it are done, and may run alongside
        other L{run} calls.
        """
        if self._orderedPending:
            d = self._afterOrdered()
            d.addCallback(lambda _: self._submit(fn, args))
        else:
            d = self._submit(fn, args)
        done = defer.Deferred()
        self._inFlight.add(done)

        def finished(result):
            self._inFlight.discard(done)
            done.callback(None)
            return result

        return d.addBoth(finished)

    def runInOrder(self, fn, *args):
        """
        Like L{run}, for writes the caller need not wait for: each starts
        once every call made before it is done, and the calls made after it
        wait for it, so they take effect in the order they were made.
        """
        result = defer.Deferred()
        self._orderedPending += 1
        earlier = list(self._inFlight)

        def finished(outcome):
            self._orderedPending -= 1
            result.callback(outcome)

        def start(_):
            d = defer.DeferredList(earlier) if earlier else defer.succeed(None)
            d.addCallback(lambda _: self._submit(fn, args))
            return d.addBoth(finished)

        self._ordered.addCallback(start)
        return result

    def open(self):
        """Create or migrate the database; fires when it is ready."""
        if isinstance(self.database, SQLite):
            os.makedirs(os.path.dirname(os.path.abspath(self.database.path)), exist_ok=True)
        d = self.run(migrate)

        def report(applied):
            if applied:
                log.info("database {database}: applied schema versions {versions}",
                         database=str(self.database), versions=applied)
            return applied

        return d.addCallback(report)


# -- images


def accountImages(cursor, accountId, after=None, limit=None):
    """
    The account's images in the order they were uploaded (ties by sha256),
    those after its image C{after} when given, at most C{limit}.  Raises
    LookupError when the account has no image C{after}.
    """
    where, args = "", [accountId]
    if after is not None:
        cursor.execute(
            "SELECT uploaded FROM account_images WHERE account_id = ? AND sha256 = ?",
            (accountId, after))
        row = cursor.fetchone()
        if row is None:
            raise LookupError(after)
        where = " AND (ai.uploaded > ? OR (ai.uploaded = ? AND ai.sha256 > ?))"
        args += [row[0], row[0], after]
    cursor.execute(
        "SELECT ai.sha256, ai.name, i.size, ai.uploaded, k.sha256"
        " FROM account_images ai JOIN images i ON i.sha256 = ai.sha256"
        " LEFT JOIN image_keys k ON k.account_id = ai.account_id AND k.sha256 = ai.sha256"
        " WHERE ai.account_id = ?" + where + " ORDER BY ai.uploaded, ai.sha256"
        + ("" if limit is None else f" LIMIT {int(limit)}"),
        args,
    )
    return [
        {"sha256": r[0], "name": r[1], "size": r[2], "uploaded": r[3],
         "encrypted": r[4] is not None}
        for r in cursor.fetchall()
    ]


def imageUsage(cursor, accountId):
    """The bytes of images the account holds."""
    cursor.execute(
        "SELECT COALESCE(SUM(i.size), 0) FROM account_images ai"
        " JOIN images i ON i.sha256 = ai.sha256 WHERE ai.account_id = ?",
        (accountId,),
    )
    # PostgreSQL sums BIGINTs as NUMERIC: a Decimal.
    return int(cursor.fetchone()[0])


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


def deleteAccountImage(cursor, accountId, sha256):
    """
    Take the image off the account's images (it no longer counts against
    its quota): True, or False when the account has no such image.  The
    caller checks first that none of its VMs that are not over boots it
    (L{activeImageVMs}).  An encrypted image's key goes with it.
    """
    cursor.execute("DELETE FROM image_keys WHERE account_id = ? AND sha256 = ?",
                   (accountId, sha256))
    cursor.execute("DELETE FROM account_images WHERE account_id = ? AND sha256 = ?",
                   (accountId, sha256))
    return cursor.rowcount == 1


def activeImageVMs(cursor, accountId, sha256):
    """How many of the account's VMs that are not over boot the image."""
    cursor.execute(
        "SELECT COUNT(*) FROM vms v JOIN orders o ON o.id = v.order_id"
        " WHERE o.account_id = ? AND o.image = ? AND v.state IN ("
        + ",".join("?" * len(states.ACTIVE)) + ")",
        [accountId, sha256, *states.ACTIVE])
    return int(cursor.fetchone()[0])


# The keys of encrypted images, sealed (cpushare.server.market.imagekeys).


def setImageKey(cursor, accountId, sha256, sealed, kek):
    """Keep the sealed key of the account's image (replacing one given before)."""
    cursor.execute("DELETE FROM image_keys WHERE account_id = ? AND sha256 = ?",
                   (accountId, sha256))
    cursor.execute(
        "INSERT INTO image_keys (account_id, sha256, sealed, kek, created)"
        " VALUES (?, ?, ?, ?, ?)", (accountId, sha256, sealed, kek, now()))


def imageKey(cursor, accountId, sha256):
    """(sealed, kek) of the account's image's key, or None when it has none."""
    cursor.execute("SELECT sealed, kek FROM image_keys WHERE account_id = ? AND sha256 = ?",
                   (accountId, sha256))
    row = cursor.fetchone()
    return None if row is None else (row[0], row[1])


def imageKeyKEKs(cursor):
    """{kek id: how many image keys it sealed}."""
    cursor.execute("SELECT kek, COUNT(*) FROM image_keys GROUP BY kek")
    return {row[0]: int(row[1]) for row in cursor.fetchall()}


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
        " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (accountId, image, vms, cores, memory, states.OrderState.OPEN, stamp),
    )
    orderId = cursor.fetchone()[0]
    ids = []
    for _ in range(vms):
        cursor.execute(
            "INSERT INTO vms (order_id, mac, state, created)"
            " VALUES (?, '', ?, ?) RETURNING id",
            (orderId, states.VMState.PENDING, stamp),
        )
        vmId = cursor.fetchone()[0]
        cursor.execute("UPDATE vms SET mac = ? WHERE id = ?", (macFor(vmId), vmId))
        ids.append(vmId)
    return orderId, ids


def orderTerms(cursor, orderId):
    """(image, cores, memory, buyer's account name) of an order."""
    cursor.execute(
        "SELECT o.image, o.cores, o.memory, a.name FROM orders o"
        " JOIN accounts a ON a.id = o.account_id WHERE o.id = ?", (orderId,))
    return tuple(cursor.fetchone())


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
        " WHERE v.state IN (" + ",".join("?" * len(states.ACTIVE)) + ")"
        " ORDER BY v.id",
        states.ACTIVE,
    )
    return cursor.fetchall()


def accountVMs(cursor, accountId, before=None, limit=1000):
    """The account's VMs, newest first, older than VM C{before} when given."""
    cursor.execute(
        "SELECT v.id, v.order_id, s.name, v.state, v.mac, v.ip, o.cores, o.memory,"
        " v.started, v.ended, v.cpu_seconds, v.reason, v.replica_group"
        " FROM vms v JOIN orders o ON o.id = v.order_id"
        " LEFT JOIN accounts s ON s.id = v.seller_account_id"
        " WHERE o.account_id = ? AND v.id < ? ORDER BY v.id DESC LIMIT ?",
        (accountId, 2**62 if before is None else before, limit),
    )
    keys = ("vm", "order", "seller", "state", "mac", "ip", "cores", "memory",
            "started", "ended", "cpu_seconds", "reason", "replica_group")
    return [dict(zip(keys, row)) for row in cursor.fetchall()]
