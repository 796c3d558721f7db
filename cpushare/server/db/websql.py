"""
The web site's queries (schema/013_web.sql): web passwords, browser
sessions and one-time login links, and the operator's web administrators.

Every function takes a cursor and runs inside one of the store's
transactions (L{cpushare.server.db.store.Store.run}); times are epoch
seconds of the market's clock, given by the caller.  Only live accounts
(neither deleted nor suspended) log in or keep a session.
"""

import attr

from cpushare.server.db.store import Account

# Live accounts only: what every lookup joins on.
_LIVE = "a.deleted IS NULL AND a.suspended IS NULL"


@attr.s(frozen=True, slots=True)
class WebSession:
    """A browser's session: whose, whether an administrator, its CSRF token."""

    account: Account = attr.ib()
    admin: bool = attr.ib()
    csrf: str = attr.ib()


def setPassword(cursor, accountId, passwordHash, now):
    """Store the account's password hash; its browsers' sessions end."""
    cursor.execute("DELETE FROM web_passwords WHERE account_id = ?", (accountId,))
    cursor.execute("INSERT INTO web_passwords (account_id, hash, changed) VALUES (?, ?, ?)",
                   (accountId, passwordHash, now))
    cursor.execute("DELETE FROM web_sessions WHERE account_id = ?", (accountId,))


def passwordOf(cursor, name):
    """(account id, password hash) of the live account C{name}, or None."""
    cursor.execute(
        "SELECT a.id, p.hash FROM accounts a JOIN web_passwords p ON p.account_id = a.id"
        f" WHERE a.name = ? AND {_LIVE}", (name,))
    return cursor.fetchone()


def replacePasswordHash(cursor, accountId, old, new):
    """A stronger hash of the same password, unless it changed meanwhile."""
    cursor.execute("UPDATE web_passwords SET hash = ? WHERE account_id = ? AND hash = ?",
                   (new, accountId, old))


def addLoginToken(cursor, accountId, tokenHash, expires, now, perAccount):
    """
    Store a login link's token hash; expired tokens go, and an account keeps
    at most C{perAccount} unused ones (its oldest go first).
    """
    cursor.execute("DELETE FROM web_login_tokens WHERE expires <= ?", (now,))
    cursor.execute(
        "SELECT id FROM web_login_tokens WHERE account_id = ? ORDER BY expires DESC",
        (accountId,))
    for (old,) in cursor.fetchall()[perAccount - 1:]:
        cursor.execute("DELETE FROM web_login_tokens WHERE id = ?", (old,))
    cursor.execute("INSERT INTO web_login_tokens (id, account_id, expires) VALUES (?, ?, ?)",
                   (tokenHash, accountId, expires))


def loginTokenAccount(cursor, tokenHash, now):
    """The name of the live account a login token is for, or None; the token stays unused."""
    cursor.execute(
        "SELECT a.name, t.expires FROM web_login_tokens t"
        f" JOIN accounts a ON a.id = t.account_id WHERE t.id = ? AND {_LIVE}", (tokenHash,))
    row = cursor.fetchone()
    if row is None or row[1] <= now:
        return None
    return row[0]


def useLoginToken(cursor, tokenHash, now):
    """The live account id a login token is for, or None; a token is used once."""
    cursor.execute(
        "SELECT t.account_id, t.expires FROM web_login_tokens t"
        f" JOIN accounts a ON a.id = t.account_id WHERE t.id = ? AND {_LIVE}", (tokenHash,))
    row = cursor.fetchone()
    cursor.execute("DELETE FROM web_login_tokens WHERE id = ?", (tokenHash,))
    if row is None or cursor.rowcount != 1 or row[1] <= now:
        return None
    return row[0]


def addSession(cursor, sessionHash, accountId, csrf, now, idle, perAccount):
    """
    Store a new session; sessions idle for C{idle} seconds go, and an
    account keeps at most C{perAccount} (the least recently used go first).
    """
    cursor.execute("DELETE FROM web_sessions WHERE seen <= ?", (now - idle,))
    cursor.execute("SELECT id FROM web_sessions WHERE account_id = ? ORDER BY seen DESC",
                   (accountId,))
    for (old,) in cursor.fetchall()[perAccount - 1:]:
        cursor.execute("DELETE FROM web_sessions WHERE id = ?", (old,))
    cursor.execute(
        "INSERT INTO web_sessions (id, account_id, csrf, created, seen) VALUES (?, ?, ?, ?, ?)",
        (sessionHash, accountId, csrf, now, now))


def session(cursor, sessionHash, now, idle, touchAfter):
    """
    The L{WebSession} of a live account with this id, or None (an idle one
    is deleted).  Its last use is written when older than C{touchAfter}.
    """
    cursor.execute(
        "SELECT a.id, a.name, a.created, a.web_admin, s.csrf, s.seen FROM web_sessions s"
        f" JOIN accounts a ON a.id = s.account_id WHERE s.id = ? AND {_LIVE}",
        (sessionHash,))
    row = cursor.fetchone()
    if row is None:
        return None
    accountId, name, created, admin, csrf, seen = row
    if seen <= now - idle:
        cursor.execute("DELETE FROM web_sessions WHERE id = ?", (sessionHash,))
        return None
    if seen <= now - touchAfter:
        cursor.execute("UPDATE web_sessions SET seen = ? WHERE id = ?", (now, sessionHash))
    return WebSession(Account(accountId, name, created), bool(admin), csrf)


def endSession(cursor, sessionHash):
    cursor.execute("DELETE FROM web_sessions WHERE id = ?", (sessionHash,))


def setWebAdmin(cursor, name, admin):
    """Make the live account C{name} a web administrator or not; whether it exists."""
    cursor.execute("UPDATE accounts SET web_admin = ? WHERE name = ? AND deleted IS NULL",
                   (1 if admin else 0, name))
    return cursor.rowcount == 1
