"""
The web site's SQL (cpushare/server/db/websql.py) on SQLite and on
PostgreSQL: a login token works once and not after it expires, sessions
end when idle, on a new password or a suspension, and an account holds a
bounded number of each.
"""

from cpushare.server.db import store, websql

IDLE = 100.0


def account(conn, name):
    return store.transact(conn, store.createAccount, name, "fp-" + name)


def test_a_login_token_works_once_and_only_before_it_expires(conn):
    alice = account(conn, "alice")
    store.transact(conn, websql.addLoginToken, alice, "t1", 300.0, 0.0, 5)
    store.transact(conn, websql.addLoginToken, alice, "t2", 300.0, 0.0, 5)
    assert store.transact(conn, websql.useLoginToken, "t1", 10.0) == alice
    assert store.transact(conn, websql.useLoginToken, "t1", 10.0) is None
    assert store.transact(conn, websql.useLoginToken, "t2", 300.0) is None, "expired"
    assert store.transact(conn, websql.useLoginToken, "nothing", 10.0) is None


def test_an_account_keeps_a_few_tokens_and_sessions(conn):
    alice = account(conn, "alice")
    for i in range(10):
        store.transact(conn, websql.addLoginToken, alice, f"t{i}", 300.0 + i, float(i), 3)
        store.transact(conn, websql.addSession, f"s{i}", alice, "c", float(i), IDLE, 3)
    count = lambda table: store.transact(
        conn, lambda c: c.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    assert (count("web_login_tokens"), count("web_sessions")) == (3, 3)
    assert store.transact(conn, websql.useLoginToken, "t9", 20.0) == alice
    assert store.transact(conn, websql.useLoginToken, "t0", 20.0) is None
    assert store.transact(conn, websql.session, "s9", 20.0, IDLE, 60.0) is not None
    assert store.transact(conn, websql.session, "s0", 20.0, IDLE, 60.0) is None


def test_a_session_ends_when_idle_on_a_new_password_or_a_suspension(conn):
    alice = account(conn, "alice")
    store.transact(conn, websql.addSession, "s", alice, "token", 0.0, IDLE, 20)
    found = store.transact(conn, websql.session, "s", IDLE - 1, IDLE, 10.0)
    assert (found.account.name, found.admin, found.csrf) == ("alice", False, "token")
    # Used at IDLE - 1: alive until 2 x IDLE - 1.
    assert store.transact(conn, websql.session, "s", 2 * IDLE - 2, IDLE, 10.0) is not None
    assert store.transact(conn, websql.session, "s", 3 * IDLE, IDLE, 10.0) is None
    store.transact(conn, websql.addSession, "s2", alice, "token", 0.0, IDLE, 20)
    store.transact(conn, websql.setPassword, alice, "$argon2id$...", 1.0)
    assert store.transact(conn, websql.session, "s2", 1.0, IDLE, 10.0) is None
    assert store.transact(conn, websql.passwordOf, "alice") == (alice, "$argon2id$...")
    store.transact(conn, websql.addSession, "s3", alice, "token", 1.0, IDLE, 20)
    assert store.transact(conn, websql.setWebAdmin, "alice", True)
    assert store.transact(conn, websql.session, "s3", 1.0, IDLE, 10.0).admin
    store.transact(conn, store.suspendAccount, "alice")
    assert store.transact(conn, websql.session, "s3", 1.0, IDLE, 10.0) is None
    assert store.transact(conn, websql.passwordOf, "alice") is None
    assert not store.transact(conn, websql.setWebAdmin, "nobody", True)
