"""
Trusted computing with real parts: the real cpushare-server trusting the
test CA of software TPMs (--tpm-test-ca), real sellers on swtpm (--tpm,
with the synthetic boot's event log: test/swtpm.py), the CLI, and seller
programs that cheat (test/integration/cheatingtpmseller.py): an honest
seller enrols, is shown attested and takes a trusted order at its trusted
price; a TPM of an unknown CA, a replayed quote, a quote of another TPM, a
changed QEMU or client, an event log that does not replay are each refused
with the reason in the market's log and in `sellers --explain --trusted`,
and a trusted order never lands on them.
"""

import os
import shutil
import subprocess
import sys

import pytest

from cpushare.attest.eventlog import parseTCG
from test.swtpm import SoftwareTPMs, swtpms  # noqa: F401  (the fixture)
from test.unit.livecdfakes import otherISO

from . import cheatingtpmseller
from .conftest import Market, cpushare, executable, startSeller, waitForSellers

pytestmark = pytest.mark.slow

ATTEST_EVERY = 10       # the least the server takes
QEMU = shutil.which("qemu-system-x86_64")


def allowHonestSellers(market, tpm):
    """The operator's policy: the swtpm's boot, this client and QEMU (as the seller prints them)."""
    with open(tpm.eventLog, "rb") as f:
        for event in parseTCG(f.read()):
            if event["kind"] in ("firmware", "kernel"):
                assert market.admin("tpm-policy", "add", event["kind"], event["digest"]).status == 0
    printed = subprocess.run(
        [sys.executable, "-m", "cpushare.client.seller.trusted", "--qemu", QEMU],
        capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert [line.split()[:3] for line in printed] == [
        ["cpushare-admin", "tpm-policy", "add"]] * 2, printed
    for line in printed:
        added = market.admin(*line.split()[1:])
        assert added.status == 0, added


@pytest.fixture
def trustedMarket(processes, tmp_path, swtpms):  # noqa: F811
    market = Market(processes, tmp_path / "market", extra=[
        "--tpm-test-ca", os.path.join(swtpms.caFolder, "ca.pem"),
        "--attest-every", str(ATTEST_EVERY), "--trusted-commission", "10"])
    market.start()
    return market


def tpmSeller(processes, market, home, name, tpm, cheat=None, extra=(), monkeypatch=None):
    """A seller on software TPM C{tpm} (honest, or cheating as C{cheat} says)."""
    market.register(home, name)
    args = ["--tpm", tpm.spec, "--price", "0.02", "--trusted-price", "0.03", *extra]
    if tpm.eventLog:
        args += ["--tpm-event-log", tpm.eventLog]
    if cheat is None:
        return startSeller(processes, home, name=name, extra=args)
    monkeypatch.setenv("CPUSHARE_TPM_CHEAT", cheat)
    proc = processes.start(name, [
        *cheatingtpmseller.TWISTD, "-n", "--pidfile=", "cpushare-seller", "--home", home,
        "--cores", "2", "--memory", "1024", "--accel", "tcg", *args])
    monkeypatch.delenv("CPUSHARE_TPM_CHEAT")
    return proc


def buyerWithImage(market, tmp_path):
    bob = market.register(tmp_path / "bob", "bob")
    iso = tmp_path / "job.iso"
    otherISO(str(iso))
    uploaded = cpushare(bob, "image", "upload", iso)
    assert uploaded.status == 0, uploaded
    return bob, uploaded.stdout.split("sha256 ")[1].split()[0]


def byName(sellers):
    return {s["name"]: s for s in sellers}


def explained(home, name):
    """Why `sellers --explain --trusted` leaves seller C{name} out (its text line)."""
    result = cpushare(home, "sellers", "--trusted", "--explain")
    assert result.status == 0, result
    _, _, excluded = result.stdout.partition("\nexcluded:\n")
    found = [line.strip() for line in excluded.splitlines() if line.strip().startswith(name + " ")]
    return found[0] if found else None


def test_an_honest_seller_is_attested_and_takes_trusted_orders_at_its_premium(
        processes, trustedMarket, swtpms, tmp_path):  # noqa: F811
    market, tpm = trustedMarket, swtpms.make()
    allowHonestSellers(market, tpm)
    bob, image = buyerWithImage(market, tmp_path)
    seller = tpmSeller(processes, market, tmp_path / "sam", "sam", tpm)
    market.register(tmp_path / "pat", "pat")
    startSeller(processes, tmp_path / "pat", name="pat", extra=["--price", "0.01"])

    listed = byName(waitForSellers(
        bob, lambda s: len(s) == 2 and any(x.get("attested") for x in s),
        "sam attested, pat online", processes, timeout=20))
    assert listed["sam"]["trust"] is None and listed["sam"]["trusted_price"] == 30_000, listed
    market.waitForLog("seller sam enrolled its TPM")
    table = cpushare(bob, "sellers")
    assert "TRUSTED" in table.stdout and "ago" in table.stdout, table

    dry = cpushare(bob, "order", "place", "--image", image, "--trusted", "--dry-run")
    assert dry.status == 0, dry
    assert "sam" in dry.stdout and "pat" not in dry.stdout, dry
    assert "trusted computing costs 0.01 more an hour" in dry.stdout, dry
    # An untrusted order goes to the cheaper seller without a TPM.
    cheap = cpushare(bob, "order", "place", "--image", image, "--dry-run")
    assert "pat" in cheap.stdout and "trusted computing" not in cheap.stdout, cheap
    why = explained(bob, "pat")
    assert why is not None and "has no TPM enrolled" in why, why

    # A second connection of the same TPM is enrolled already: no new challenge.
    seller.proc.stop()
    again = startSeller(processes, tmp_path / "sam", name="sam", extra=[
        "--tpm", tpm.spec, "--tpm-event-log", tpm.eventLog, "--trusted-price", "0.03"])
    again.proc.waitForLog("this TPM's attestation key is enrolled", timeout=20)


def test_a_tpm_of_an_unknown_endorsement_ca_is_refused(processes, trustedMarket, swtpms,
                                                       tmp_path):  # noqa: F811
    market = trustedMarket
    allowHonestSellers(market, swtpms.make(boot=True))
    strangers = SoftwareTPMs(tmp_path / "strangers")      # a CA the market does not trust
    try:
        bob, image = buyerWithImage(market, tmp_path)
        tpmSeller(processes, market, tmp_path / "sam", "sam", strangers.make())
        market.waitForLog("refused the TPM enrolment of seller sam: the endorsement"
                          " certificate is not signed by a CA the operator trusts", timeout=20)
        waitForSellers(bob, lambda s: len(s) == 1, "sam online", processes)
        why = explained(bob, "sam")
        assert why is not None and "TPM enrolment refused: the endorsement certificate is not" \
            " signed by a CA the operator trusts" in why, why
        dry = cpushare(bob, "order", "place", "--image", image, "--trusted", "--dry-run")
        assert dry.status == 0 and "0 of 1 VMs would be placed" in dry.stdout, dry
    finally:
        strangers.stop()


CHEATS = [
    ("old-nonce", "the quote's nonce is not the one asked for (a replayed quote)"),
    ("other-tpm", "the quote's signature is not the attestation key's (signed by another TPM"),
    ("qemu", "QEMU's digest"),
    ("client", "the client's digest cccccccccccccccc... (cpushare) is not allowed"),
    ("eventlog", "the event log does not replay to the quoted PCR 23"),
]


@pytest.mark.parametrize("cheat,reason", CHEATS, ids=[c for c, _ in CHEATS])
def test_a_cheating_seller_is_refused_and_gets_no_trusted_order(
        processes, trustedMarket, swtpms, tmp_path, monkeypatch, cheat, reason):  # noqa: F811
    market, tpm = trustedMarket, swtpms.make()
    allowHonestSellers(market, tpm)
    bob, image = buyerWithImage(market, tmp_path)
    home = tmp_path / "mallory"
    if cheat == "qemu":
        # An honest program running another QEMU than the operator allowed.
        other = tmp_path / "qemu-system-x86_64"
        other.write_text(f"#!/bin/sh\nexec {QEMU} \"$@\"\n")
        other.chmod(0o755)
        tpmSeller(processes, market, home, "mallory", tpm, extra=["--qemu", other])
    else:
        mode = f"other-tpm:{swtpms.make().spec}" if cheat == "other-tpm" else cheat
        tpmSeller(processes, market, home, "mallory", tpm, cheat=mode, monkeypatch=monkeypatch)
    market.waitForLog("seller mallory enrolled its TPM", timeout=20)
    market.waitForLog("seller mallory: not attested: ", timeout=20)
    assert reason in market.log(), market.log()[-3000:]
    waitForSellers(bob, lambda s: len(s) == 1, "mallory online", processes)
    why = explained(bob, "mallory")
    assert why is not None and "not attested: " in why and reason[:40] in why, why
    placed = cpushare(bob, "order", "place", "--image", image, "--trusted", "--dry-run")
    assert placed.status == 0 and "0 of 1 VMs would be placed" in placed.stdout, placed
    # Placed for real, the order waits: it never lands on the cheater.
    real = cpushare(bob, "order", "place", "--image", image, "--trusted", "--json")
    assert real.status == 0, real
    vms = cpushare(bob, "vms", "--json").json()
    assert [vm["state"] for vm in vms] == ["pending"], vms
    assert executable("twistd")
