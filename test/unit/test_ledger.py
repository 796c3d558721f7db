"""The double-entry ledger on real databases: SQLite and PostgreSQL (test/conftest.py)."""

import os

import pytest

from cpushare.server import admin
from cpushare.server.money import ledger
from cpushare.server.db import store
from cpushare.server.db.database import SQLite
from cpushare.server.money.ledger import COMMISSION, EARNINGS, FUNDS, HELD, MICRO, PAYPAL


@pytest.fixture
def alice(conn):
    return store.transact(conn, store.createAccount, "alice", "ab" * 32)


@pytest.fixture
def bob(conn):
    return store.transact(conn, store.createAccount, "bob", "cd" * 32)


def run(conn, fn, *args, **kw):
    return store.transact(conn, lambda c: fn(c, *args, **kw))


def deposit(conn, owner, amount, commission, reference=None):
    return run(conn, ledger.post, "deposit", "PayPal payment", [
        (PAYPAL, None, -amount),
        (FUNDS, owner, amount - commission),
        (COMMISSION, None, commission),
    ], reference=reference)


def test_amounts_parse_to_micro_units_and_format_back():
    assert ledger.parseAmount("20") == 20 * MICRO
    assert ledger.parseAmount("20.5") == 20_500_000
    assert ledger.parseAmount(" 0.000001 ") == 1
    assert ledger.formatAmount(20 * MICRO) == "20.00"
    assert ledger.formatAmount(20_500_000) == "20.50"
    assert ledger.formatAmount(1) == "0.000001"
    assert ledger.formatAmount(-1_234_500) == "-1.2345"
    with pytest.raises(TypeError):
        ledger.formatAmount(1.5)


@pytest.mark.parametrize("text, problem", [
    ("-5", "not an amount"),
    ("1e3", "not an amount"),
    ("1.0000001", "not an amount"),
    ("abc", "not an amount"),
    ("", "not an amount"),
    ("0.00", "zero"),
    ("99999999999", "not an amount"),
    ("2000000000", "more than the largest"),
])
def test_bad_amounts_are_refused_naming_the_problem(text, problem):
    with pytest.raises(ledger.BadAmount, match=problem):
        ledger.parseAmount(text)


def test_a_deposit_credits_funds_less_commission_and_the_books_balance(conn, alice):
    deposit(conn, alice, 20 * MICRO, MICRO)
    assert run(conn, ledger.balances, alice) == {
        FUNDS: 19 * MICRO, HELD: 0, EARNINGS: 0, ledger.PAYOUT: 0, ledger.PENDING: 0}
    assert run(conn, ledger.balance, COMMISSION) == MICRO
    assert run(conn, ledger.balance, PAYPAL) == -20 * MICRO
    books = run(conn, ledger.books)
    assert books["ok"] and books["total"] == 0 and books["transactions"] == 1
    assert books["byKind"] == {FUNDS: 19 * MICRO, COMMISSION: MICRO, PAYPAL: -20 * MICRO}


@pytest.mark.parametrize("legs, problem", [
    ([(FUNDS, 1, 5), (COMMISSION, None, -4)], "sum to 1 micro-units"),
    ([(FUNDS, 1, 5)], "at least two accounts"),
    ([(FUNDS, 1, 0), (COMMISSION, None, 0)], "at least two accounts"),
    ([(FUNDS, 1, 1.5), (COMMISSION, None, -1.5)], "integer of micro-units"),
    ([(FUNDS, 1, True), (COMMISSION, None, -1)], "integer of micro-units"),
    ([(FUNDS, 1, 10**20), (COMMISSION, None, -10**20)], "beyond any real amount"),
])
def test_unbalanced_or_malformed_transactions_change_nothing(conn, alice, legs, problem):
    legs = [(k, alice if o == 1 else o, a) for k, o, a in legs]
    with pytest.raises(ledger.Unbalanced, match=problem):
        run(conn, ledger.post, "bad", "bad", legs)
    assert run(conn, ledger.books)["transactions"] == 0


def test_an_owner_account_never_goes_negative(conn, alice, bob):
    deposit(conn, alice, 10 * MICRO, 0)
    with pytest.raises(ledger.InsufficientFunds) as e:
        run(conn, ledger.post, "hold", "VM 1", [
            (FUNDS, alice, -11 * MICRO), (HELD, alice, 11 * MICRO)])
    assert "funds:%d" % alice in str(e.value)
    assert "holds 10.00 and 11.00 is needed" in str(e.value)
    # Nothing of the refused transaction is left behind.
    assert run(conn, ledger.balances, alice)[HELD] == 0
    assert run(conn, ledger.books)["transactions"] == 1
    # The market's own accounts may go negative (PayPal's does by design).
    run(conn, ledger.post, "hold", "VM 1", [
        (FUNDS, alice, -4 * MICRO), (HELD, alice, 4 * MICRO)])
    run(conn, ledger.post, "charge", "VM 1", [
        (HELD, alice, -3 * MICRO), (EARNINGS, bob, 3 * MICRO)])
    assert run(conn, ledger.balances, alice)[FUNDS] == 6 * MICRO
    assert run(conn, ledger.balances, alice)[HELD] == MICRO
    assert run(conn, ledger.balances, bob)[EARNINGS] == 3 * MICRO
    assert run(conn, ledger.books)["ok"]


def test_a_reference_is_posted_only_once(conn, alice):
    deposit(conn, alice, 10 * MICRO, 0, reference="paypal:PAY-1")
    with pytest.raises(ledger.AlreadyPosted, match="paypal:PAY-1 was already posted"):
        deposit(conn, alice, 10 * MICRO, 0, reference="paypal:PAY-1")
    assert run(conn, ledger.balances, alice)[FUNDS] == 10 * MICRO


def test_the_statement_lists_every_movement_newest_first(conn, alice):
    deposit(conn, alice, 10 * MICRO, MICRO)
    run(conn, ledger.post, "hold", "VM 3 for ten minutes", [
        (FUNDS, alice, -2 * MICRO), (HELD, alice, 2 * MICRO)])
    rows = run(conn, ledger.statement, alice)
    assert [(r["kind"], r["account"], r["amount"]) for r in rows] == [
        ("hold", HELD, 2 * MICRO),
        ("hold", FUNDS, -2 * MICRO),
        ("deposit", FUNDS, 9 * MICRO),
    ]
    assert rows[0]["memo"] == "VM 3 for ten minutes"


def adminArguments(conn):
    """cpushare-admin's options for the database of C{conn}."""
    if isinstance(conn.database, SQLite):
        return ["--data", os.path.dirname(conn.database.path)]
    return ["--db", conn.database.url]


def test_books_find_a_tampered_entry(conn, alice, capsys):
    deposit(conn, alice, 10 * MICRO, MICRO)
    assert admin.main(adminArguments(conn) + ["books"]) == 0
    out = capsys.readouterr().out
    assert "the books balance" in out and "paypal" in out and "-10.00" in out
    # Someone edits an entry behind the ledger's back.
    conn.execute("UPDATE ledger_entries SET amount = amount + 1 WHERE amount > 0"
                 " AND id = (SELECT MIN(id) FROM ledger_entries WHERE amount > 0)")
    report = run(conn, ledger.books)
    assert not report["ok"] and report["total"] == 1 and report["unbalanced"] == [(1, 1)]
    assert report["drift"] == [("funds:%d" % alice, 9 * MICRO, 9 * MICRO + 1)]
    assert admin.main(adminArguments(conn) + ["books"]) == 2
    assert "UNBALANCED transaction 1" in capsys.readouterr().out
    conn.execute("UPDATE ledger_entries SET amount = -5 WHERE account_id ="
                 " (SELECT id FROM ledger_accounts WHERE kind = 'funds')")
    assert run(conn, ledger.books)["negative"] == [("funds:%d" % alice, -5)]


def test_books_find_a_balance_that_drifted_from_its_entries(conn, alice, capsys):
    deposit(conn, alice, 10 * MICRO, MICRO)
    # The running balance is edited behind the ledger's back: the entries
    # still balance, but the balance no longer is their sum.
    conn.execute("UPDATE ledger_accounts SET balance = balance + 5 WHERE kind = 'funds'")
    report = run(conn, ledger.books)
    assert not report["ok"] and report["unbalanced"] == [] and report["total"] == 0
    assert report["drift"] == [("funds:%d" % alice, 9 * MICRO + 5, 9 * MICRO)]
    assert admin.main(adminArguments(conn) + ["books"]) == 2
    assert (f"DRIFT funds:{alice}: its balance says 9.000005, its entries sum to 9.00"
            in capsys.readouterr().out)
