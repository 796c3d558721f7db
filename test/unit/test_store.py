"""The SQL store's queries on real databases: SQLite and PostgreSQL (test/conftest.py)."""

import pytest

from cpushare.server.db import store


def test_migrations_apply_once(conn):
    assert store.transact(conn, store.migrate) == []
    versions = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [v for (v,) in versions] == [n for n, _, _ in store.migrations()]


def test_accounts_are_found_by_certificate(conn):
    accountId = store.transact(conn, store.createAccount, "alice", "ab" * 32)
    account, reason = store.transact(conn, store.accountForCertificate, "ab" * 32)
    assert reason is None
    assert account.id == accountId and account.name == "alice"
    account, reason = store.transact(conn, store.accountForCertificate, "cd" * 32)
    assert account is None and "not registered" in reason


def test_names_are_unique_and_a_failed_create_changes_nothing(conn):
    store.transact(conn, store.createAccount, "alice", "ab" * 32)
    with pytest.raises(store.NameTaken):
        store.transact(conn, store.createAccount, "alice", "cd" * 32)
    assert [a["name"] for a in store.transact(conn, store.listAccounts)] == ["alice"]
    account, _ = store.transact(conn, store.accountForCertificate, "cd" * 32)
    assert account is None


def test_a_deleted_account_is_refused_with_the_reason_and_keeps_its_name(conn):
    store.transact(conn, store.createAccount, "alice", "ab" * 32)
    assert store.transact(conn, store.deleteAccount, "alice")
    assert not store.transact(conn, store.deleteAccount, "alice")
    account, reason = store.transact(conn, store.accountForCertificate, "ab" * 32)
    assert account is None and "'alice' was deleted" in reason
    with pytest.raises(store.NameTaken):
        store.transact(conn, store.createAccount, "alice", "ef" * 32)
