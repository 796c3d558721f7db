"""
Money in and out, end to end: the real cpushare-server with PayPal set up
and pointed at the fake of PayPal's REST endpoints (test/paypalfake.py,
run as a process on 127.0.0.1), the cpushare CLI, and a real browser
(headless Chromium, trusting the market's CA through an NSS database in
its own HOME) following PayPal's approval link back to the market's HTTPS
endpoint.
"""

import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cpushare.server.money import ledger
from cpushare.server.db import store

from .conftest import LOOPBACK, Market, assertOneLineError, browserHome, cpushare, waitUntil

FAKE = Path(__file__).parent.parent / "paypalfake.py"
CLIENT_ID = "market-app-id"
SECRET = "market-app-secret"
MICRO = 1_000_000


class PayPalFake:
    """test/paypalfake.py as a process, and its control endpoints."""

    def __init__(self, processes, root):
        self.addressFile = Path(root) / "paypal.address"
        self.proc = processes.start("paypal", [
            sys.executable, FAKE, "--client-id", CLIENT_ID, "--secret", SECRET,
            "--address-file", self.addressFile,
        ])
        port = self.proc.waitFor(
            lambda: self.addressFile.exists() and json.loads(self.addressFile.read_text()),
            "the PayPal fake listening")["port"]
        self.url = f"http://{LOOPBACK}:{port}"

    def knobs(self, **changes):
        request = urllib.request.Request(
            self.url + "/_fake/knobs", data=json.dumps(changes).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def state(self):
        with urllib.request.urlopen(self.url + "/_fake/state", timeout=10) as response:
            return json.loads(response.read())

    def executions(self):
        return sum(1 for method, path in self.state()["requests"]
                   if method == "POST" and path.endswith("/execute"))


class Browser:
    """
    Headless Chromium with a HOME of its own whose NSS database trusts the
    market's CA (as a buyer who added it would); no certificate error is
    ignored.
    """

    def __init__(self, root, caPath, name="browser"):
        self.chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        certutil = shutil.which("certutil")
        if self.chromium is None or certutil is None:
            pytest.fail("these tests need Debian's chromium and libnss3-tools: "
                        "run tools/host-deps.sh as root (or apt-get install them)")
        self.home = browserHome(Path(root) / f"{name}-home", caPath, certutil)

    def open(self, url):
        """Load C{url}, following redirects; returns the page's DOM as text."""
        argv = [self.chromium, "--headless", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking",
                f"--user-data-dir={self.home / 'profile'}", "--dump-dom", url]
        if os.geteuid() == 0:
            # Chromium's own process sandbox cannot run as root; this is not
            # about certificates, which are checked as usual.
            argv.insert(1, "--no-sandbox")
        env = dict(os.environ, HOME=str(self.home))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=90, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout


@pytest.fixture
def paypal(processes, tmp_path):
    return PayPalFake(processes, tmp_path)


def startPaidMarket(processes, tmp_path, paypal, db=None):
    """A market taking payments through the fake: 5% commission, payouts from 5.00."""
    secret = tmp_path / "paypal-secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    market = Market(processes, tmp_path / "market", db=db, extra=[
        "--web", f"tcp:0:interface={LOOPBACK}",
        "--paypal-client-id", CLIENT_ID, "--paypal-secret-file", secret,
        "--paypal-endpoint", paypal.url,
        "--commission", "5", "--payout-minimum", "5.00", "--payout-poll", "0.3",
    ]).start()
    web = json.loads((market.data / "web.address").read_text())
    market.webUrl = f"https://localhost:{web['port']}"
    market.database = db or str(market.data / "market.sqlite")
    return market


@pytest.fixture
def paidMarket(processes, tmp_path, paypal):
    return startPaidMarket(processes, tmp_path, paypal)


@pytest.fixture(params=["sqlite", "postgresql"])
def paidMarketOnEither(request, processes, tmp_path, paypal):
    """The same on SQLite, and on PostgreSQL (test/conftest.py)."""
    db = request.getfixturevalue("postgresURL") if request.param == "postgresql" else None
    return startPaidMarket(processes, tmp_path, paypal, db)


@pytest.fixture
def browser(tmp_path, paidMarket):
    return Browser(tmp_path, paidMarket.ca)


def balanceOf(home):
    result = cpushare(home, "balance", "--json")
    assert result.status == 0, result
    return result.json()


def earningsOf(home):
    result = cpushare(home, "earnings", "--json")
    assert result.status == 0, result
    return result.json()


def approveWithoutBrowser(market, link):
    """Follow an approval link with plain HTTP requests, trusting the market's CA."""
    context = ssl.create_default_context(cafile=str(market.ca))
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
    with opener.open(link, timeout=30) as response:
        return response.read().decode()


def postInMarketDatabase(market, kind, memo, legs):
    """Post a ledger transaction in the server's database, as billing does."""
    conn = store.connect(market.database)
    try:
        return store.transact(conn, ledger.post, kind, memo, legs)
    finally:
        conn.close()


def accountId(home):
    return json.loads((Path(home) / "config.json").read_text())["account_id"]


def test_a_buyer_adds_funds_with_paypal_and_a_replay_adds_nothing(
        paidMarket, paypal, browser, tmp_path, processes):
    home = paidMarket.register(tmp_path / "alice", "alice", funds=None)

    added = cpushare(home, "funds", "add", "20.00")
    assert added.status == 0, added
    lines = added.stdout.splitlines()
    # The commission and the net come before the link.
    assert "the market's commission is 1.00 (5%)" in lines[0], added
    assert "19.00 USD goes to your funds" in lines[0], added
    [link] = [line.strip() for line in lines if line.strip().startswith("http")]
    assert lines.index("  " + link) > 0
    assert link.startswith(paypal.url + "/webscr?cmd=_express-checkout&token=EC-"), link
    pending = balanceOf(home)
    assert pending["funds"] == 0
    [payment] = pending["pending"]
    assert payment["state"] == "created"

    # A browser that does not trust the market's CA never sees its page.
    stranger = Browser(tmp_path, None, name="stranger")
    assert "CPUShare" not in stranger.open(paidMarket.webUrl + "/")
    assert "CPUShare market" in browser.open(paidMarket.webUrl + "/")

    page = browser.open(link)
    assert "Funds added" in page, page
    assert "20.00 USD paid, 19.00 added to your CPUShare funds" in page, page

    after = balanceOf(home)
    assert (after["funds"], after["pending"]) == (19 * MICRO, [])
    shown = cpushare(home, "balance")
    assert shown.status == 0, shown
    assert "funds:" in shown.stdout and "19.00 USD" in shown.stdout, shown
    statement = cpushare(home, "statement")
    assert statement.status == 0, statement
    header, row = statement.stdout.splitlines()
    assert header.split()[:4] == ["TIME", "KIND", "ACCOUNT", "AMOUNT"], statement
    assert row.split()[1:5] == ["deposit", "funds", "+19.00", "19.00"], statement
    assert payment["payment"] in row, statement
    assert "commission 1.00" in row, statement

    # The same return again, from the browser's history: nothing more.
    [record] = paypal.state()["payments"]
    returnUrl = record["redirected_to"]
    assert returnUrl.startswith(paidMarket.webUrl + "/paypal/return?"), returnUrl
    page = browser.open(returnUrl)
    assert "was already completed" in page, page
    assert "Nothing more was charged or added" in page, page
    # A forged return naming a payment this market never created.
    forged = returnUrl.replace(record["id"], "PAY-FORGED0000000000000000")
    page = browser.open(forged)
    assert "This market created no payment PAY-FORGED" in page, page
    assert balanceOf(home)["funds"] == 19 * MICRO
    assert paypal.executions() == 1
    assert "credited PayPal payment " + record["id"] in paidMarket.log()
    assert "a return for payment PAY-FORGED" in paidMarket.log()

    # Bad amounts: one clear line each, nothing created at PayPal.
    for amount, problem in [("-5", "is not an amount"), ("0", "is zero"),
                            ("20.001", "has a fraction of a cent"),
                            ("20000", "more than one payment may be, 10000.00 USD"),
                            ("0.50", "less than the smallest payment")]:
        assertOneLineError(cpushare(home, "funds", "add", amount), problem)
    assert len(paypal.state()["payments"]) == 1

    books = paidMarket.admin("books")
    assert books.status == 0, books
    assert "the books balance" in books.stdout


def test_a_seller_is_paid_out_and_a_failed_payout_comes_back(
        paidMarketOnEither, paypal, tmp_path, processes):
    paidMarket = paidMarketOnEither
    buyer = paidMarket.register(tmp_path / "alice", "alice", funds=None)
    seller = paidMarket.register(tmp_path / "sam", "sam", funds=None)
    added = cpushare(buyer, "funds", "add", "40.00", "--json")
    page = approveWithoutBrowser(paidMarket, added.json()["approval_url"])
    assert "40.00 USD paid, 38.00 added" in page, page

    # Earnings come from billing the CPU time of VMs, which this test does
    # not run: post the charges billing would make, the buyer's funds paying
    # the seller's earnings, straight into the market's database.
    postInMarketDatabase(paidMarket, "charge", "CPU time (test)", [
        (ledger.FUNDS, accountId(buyer), -15 * MICRO),
        (ledger.EARNINGS, accountId(seller), 15 * MICRO),
    ])
    assert earningsOf(seller)["earnings"] == 15 * MICRO

    assertOneLineError(cpushare(seller, "payout", "12.00"), "--email")
    assertOneLineError(cpushare(seller, "payout", "1000.00", "--email", "sam@example.com"),
                       "you asked for 1000.00 USD but your earnings are 15.00 USD")
    assertOneLineError(cpushare(seller, "payout", "3.00", "--email", "sam@example.com"),
                       "below this market's payout minimum of 5.00 USD")
    assertOneLineError(cpushare(seller, "payout", "12.00", "--email", "sam@"),
                       "is not an email address")
    unchanged = earningsOf(seller)
    assert (unchanged["earnings"], unchanged["payout"], unchanged["payouts"]) == \
        (15 * MICRO, 0, [])

    paid = cpushare(seller, "payout", "12.00", "--email", "sam@example.com")
    assert paid.status == 0, paid
    assert "payout 1: 12.00 USD to sam@example.com is with PayPal" in paid.stdout, paid
    sent = waitUntil(
        lambda: (lambda e: e if e["payouts"][0]["state"] == "sent" else None)(
            earningsOf(seller)),
        "PayPal to finish payout 1", processes=paidMarket.processes)
    assert (sent["earnings"], sent["payout"]) == (3 * MICRO, 0)
    [batch] = paypal.state()["payouts"]
    assert batch["items"][0]["amount"] == {"value": "12.00", "currency": "USD"}
    assert batch["items"][0]["receiver"] == "sam@example.com"

    # The next payout fails at PayPal: its money comes back to the earnings.
    paypal.knobs(payout_outcome="FAILED")
    postInMarketDatabase(paidMarket, "charge", "CPU time (test)", [
        (ledger.FUNDS, accountId(buyer), -10 * MICRO),
        (ledger.EARNINGS, accountId(seller), 10 * MICRO),
    ])
    again = cpushare(seller, "payout")   # all of it, to the address given before
    assert again.status == 0, again
    assert "payout 2: 13.00 USD to sam@example.com" in again.stdout, again
    returned = waitUntil(
        lambda: (lambda e: e if e["payouts"][0]["state"] == "returned" else None)(
            earningsOf(seller)),
        "payout 2 to come back", processes=paidMarket.processes)
    assert (returned["earnings"], returned["payout"]) == (13 * MICRO, 0)
    assert "Receiver's account is locked" in returned["payouts"][0]["reason"]

    shown = cpushare(seller, "earnings")
    assert shown.status == 0, shown
    assert "earnings:        13.00 USD" in shown.stdout, shown
    assert "sam@example.com" in shown.stdout and "returned" in shown.stdout, shown
    statement = cpushare(seller, "statement")
    assert "payout 2 returned to earnings" in statement.stdout, statement
    assert "payout 1 to sam@example.com sent by PayPal" in statement.stdout, statement

    books = paidMarket.admin("books")
    assert books.status == 0, books
    payouts = paidMarket.admin("payouts")
    assert payouts.status == 0, payouts
    assert "sent" in payouts.stdout and "returned" in payouts.stdout, payouts


def test_a_market_without_paypal_runs_and_says_it_takes_no_payments(market, tmp_path):
    home = market.register(tmp_path / "alice", "alice", funds=None)
    assertOneLineError(cpushare(home, "funds", "add", "20.00"),
                       "this market takes no payments")
    assertOneLineError(cpushare(home, "payout", "--email", "a@example.com"),
                       "this market takes no payments")
    shown = cpushare(home, "balance")
    assert shown.status == 0, shown
    assert "this market takes no payments" in shown.stdout, shown
    assert "funds:" in shown.stdout and "0.00 USD" in shown.stdout, shown
    empty = cpushare(home, "statement")
    assert empty.status == 0 and "no movements yet" in empty.stdout, empty


@pytest.mark.parametrize("options, problem", [
    (["--paypal-client-id", "x"], "not on the command line"),
    (["--paypal-client-id", "x", "--paypal-secret-file", "/nonexistent/secret"],
     "No such file"),
    (["--commission", "150"], "not a percentage"),
    (["--payout-minimum", "0.001"], "fraction of a cent"),
    (["--currency", "JPY"], "whole units only"),
    (["--paypal-client-id", "x", "--paypal-endpoint", "http://paypal.example.com"],
     "unencrypted"),
])
def test_bad_paypal_options_stop_the_server_with_a_clear_message(options, problem, tmp_path):
    env = dict(os.environ, CPUSHARE_PAYPAL_SECRET="")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "cpushare-server",
         "--data", str(tmp_path / "data"), "--listen", f"tcp:0:interface={LOOPBACK}",
         *options],
        capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0, done
    assert problem in done.stdout + done.stderr, done
    assert "Traceback" not in done.stdout + done.stderr, done
