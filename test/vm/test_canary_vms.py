"""
Canaries with real VMs: the market runs its known-answer job on an honest
seller and on a cheating one (test/cheatingseller.py, whose result port
alters every result); the honest one is validated and paid from the
market's own account, the cheater caught: invalid, a failed canary, no
payment, a bad vote.  Real twistd processes, TLS and QEMU under TCG (one
canary VM on each seller, two at once).
"""

import re
import sqlite3

from test import cheatingseller
from test.integration.conftest import Market, waitUntil
from test.vm.test_market_vms import BOOT_TIMEOUT, run, startSeller

# Canaries come fast here: each seller gets one after 15 s on average.
CANARY_EVERY = 15


def query(market, sql, *args):
    db = sqlite3.connect(f"file:{market.data / 'market.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def test_an_honest_seller_is_paid_for_a_canary_and_a_cheating_one_caught(processes, tmp_path):
    market = Market(processes, tmp_path / "market",
                    extra=["--canary-every", CANARY_EVERY]).start()
    market.waitForLog("CPU benchmark image", timeout=BOOT_TIMEOUT)
    buyer = market.register(tmp_path / "bob", "bob")
    homes = {name: market.register(tmp_path / name, name, funds=None)
             for name in ("sam", "chet")}
    sam = startSeller(processes, homes["sam"], 1, 512, "sam", ["--price", "3.60"])
    chet = startSeller(processes, homes["chet"], 1, 512, "chet", ["--price", "3.60"],
                       twistd=cheatingseller.TWISTD)
    assert "alters every VM's result" in chet.log()
    market.waitForLog("canary VM", timeout=BOOT_TIMEOUT)

    def decided():
        log = market.log()
        right = re.search(r"canary VM (\d+) on sam answered right; paid ([0-9.]+)", log)
        caught = re.search(r"canary VM (\d+) on seller chet failed: (.*)", log)
        return (right, caught) if right and caught else None

    right, caught = waitUntil(decided, "a canary decided on each seller", 2 * BOOT_TIMEOUT,
                              processes, 1.0)
    assert "the canary's result was wrong" in caught.group(2), caught.group(0)
    assert float(right.group(2)) > 0, right.group(0)
    # The market's bad vote: the cheater is rated 0 by one rater.
    listed = {s["name"]: s for s in run(buyer, "sellers", "--json").json()}
    assert (listed["chet"]["votes"], listed["chet"]["rating"]) == (1, 0.0), listed["chet"]
    assert listed["sam"]["votes"] == 0, listed["sam"]
    # The books, at rest: canaries still running then stay undecided.
    market.stop()
    ids = dict(query(market, "SELECT name, id FROM accounts WHERE name IN ('sam', 'chet')"))
    rows = query(market, "SELECT vm_id, seller_account_id, expected, reported, passed, paid"
                         " FROM canaries WHERE passed IS NOT NULL")
    samRows = [r for r in rows if r[1] == ids["sam"]]
    chetRows = [r for r in rows if r[1] == ids["chet"]]
    assert samRows and all(r[2] == r[3] and r[4] == 1 and r[5] > 0 for r in samRows), rows
    assert chetRows and all(r[2] != r[3] and r[4] == 0 and r[5] == 0 for r in chetRows), rows
    # The honest seller's pay came from the market's grants, in one
    # transaction a canary; the cheater got nothing.
    paid = sum(r[5] for r in samRows)
    balances = dict(query(market, "SELECT name, balance FROM ledger_accounts"
                                  " WHERE name IN (?, ?, 'market:grants')",
                          f"earnings:{ids['sam']}", f"earnings:{ids['chet']}"))
    assert balances.get(f"earnings:{ids['sam']}") == paid, balances
    assert balances.get(f"earnings:{ids['chet']}", 0) == 0, balances
    references = query(market, "SELECT reference FROM ledger_transactions WHERE kind = 'canary'")
    assert sorted(r[0] for r in references) == sorted(f"canary:{r[0]}" for r in samRows)
    counts = {r[0]: r[1:] for r in query(
        market, "SELECT account_id, validated, invalid, consecutive, canaries_failed"
                " FROM validation")}
    assert counts[ids["sam"]] == (len(samRows), 0, len(samRows), 0), counts
    assert counts[ids["chet"]] == (0, len(chetRows), 0, len(chetRows)), counts
    books = market.admin("books")
    assert books.status == 0 and "the books balance" in books.stdout, books
    for name, proc in (("sam", sam), ("chet", chet)):
        assert "wrote its result" in proc.log(), name
        assert "Traceback" not in proc.log(), name
    assert "Traceback" not in market.log()
