"""
A trusted order end to end, with real parts: the real market trusting the
test CA of a software TPM, a seller on that swtpm (--tpm), a buyer whose
job livecd is uploaded encrypted.  The seller is attested, its lease's
quote measures the image, the image's key is released wrapped to the
seller's TPM, the seller decrypts into memory and QEMU boots it; the VM
gets its DHCP address on the buyer's network and runs the job.  Then the
operator removes the seller's QEMU from the policy: the next re-attestation
fails, the lease stops with the reason, and its charges end at its last
good quote.
"""

import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

from cpushare.attest.eventlog import parseTCG
from test.integration.conftest import START_TIMEOUT, Market, waitUntil
from test.swtpm import swtpms  # noqa: F401  (the fixture)
from test.vm.test_market_vms import (
    buildJobISO, consoleRun, run, startBuyer, startSeller, vms, waitForAddress,
)

ATTEST_EVERY = 10       # the least the server takes
QEMU = shutil.which("qemu-system-x86_64")
BILLING_WAIT = 5

pytestmark = pytest.mark.slow


def policyLines(tpm, qemu):
    """The operator's policy for the swtpm's boot, this client and QEMU, as admin arguments."""
    with open(tpm.eventLog, "rb") as f:
        boot = [("tpm-policy", "add", e["kind"], e["digest"]) for e in parseTCG(f.read())
                if e["kind"] in ("firmware", "kernel")]
    printed = subprocess.run(
        [sys.executable, "-m", "cpushare.client.seller.trusted", "--qemu", qemu],
        capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    return boot + [tuple(line.split()[1:]) for line in printed]


def test_a_trusted_order_boots_an_encrypted_livecd_and_stops_when_attestation_fails(
        processes, tmp_path, swtpms):  # noqa: F811
    qemu = QEMU
    tpm = swtpms.make()
    market = Market(processes, tmp_path / "market", extra=[
        "--tpm-test-ca", os.path.join(swtpms.caFolder, "ca.pem"),
        "--attest-every", str(ATTEST_EVERY), "--trusted-commission", "10",
        "--billing-interval", "2"]).start()
    lines = policyLines(tpm, qemu)
    for line in lines:
        assert market.admin(*line).status == 0, line
    [qemuDigest] = [line[3] for line in lines if line[2] == "qemu"]

    seller = market.register(tmp_path / "sam", "sam")
    buyer = market.register(tmp_path / "bob", "bob")
    sellerProc = startSeller(processes, seller, cores=1, memory=1024, extra=[
        "--tpm", tpm.spec, "--tpm-event-log", tpm.eventLog,
        "--price", "0.02", "--trusted-price", "0.03"])
    startBuyer(processes, buyer, None, "10.79.0.0")
    token = os.urandom(6).hex()
    iso = buildJobISO(tmp_path / "job", f"#!/bin/sh\necho trusted job says {token}\n",
                      network=True)
    uploaded = run(buyer, "image", "upload", "--encrypt", iso).stdout
    sha256 = uploaded.splitlines()[0].rsplit("sha256 ", 1)[1]
    market.waitForLog("seller sam enrolled its TPM")

    placed = run(buyer, "order", "place", "--image", sha256, "--trusted", "--memory", "256",
                 "--json").json()
    [vm] = placed["vm_ids"]
    ip = waitForAddress(buyer, vm, processes)
    assert ip.startswith("10.79.0."), ip
    listed = vms(buyer)[vm]
    assert (listed["state"], listed["seller"]) == ("running", "sam"), listed
    market.waitForLog(f"released the image key of VM {vm} to seller sam")
    # The decrypted image booted and runs the job.
    consoleRun(buyer, vm, "echo typed-$((6*7))", r"typed-42")
    shown = consoleRun(buyer, vm, "true", rf"trusted job says {token}")
    assert f"trusted job says {token}" in shown
    # The seller's cache holds only the ciphertext; nothing logged the key.
    key = (buyer / "image-keys" / f"{sha256}.key").read_text().strip()
    assert key not in market.log() and key not in sellerProc.log()

    # It is attested again while it runs.
    stamps = {}

    def lease():
        with sqlite3.connect(market.data / "market.sqlite") as db:
            row = db.execute(
                "SELECT started, live_since, attested, ended, charged, price, cores"
                " FROM leases WHERE vm_id = ? ORDER BY id DESC LIMIT 1", (vm,)).fetchone()
        stamps.update(zip(("started", "live", "attested", "ended", "charged", "price",
                           "cores"), row))
        return stamps

    first = lease()["attested"]
    waitUntil(lambda: lease()["attested"] > first, "a re-attestation of the lease",
              ATTEST_EVERY + 20, processes, 0.5)

    # The operator no longer allows its QEMU: the next quote fails, the VM stops.
    assert market.admin("tpm-policy", "remove", "qemu", qemuDigest).status == 0
    waitUntil(lambda: vms(buyer)[vm]["state"] == "stopped", "the lease to stop",
              ATTEST_EVERY + 30, processes, 0.5)
    reason = vms(buyer)[vm]["reason"]
    assert reason.startswith("not attested: QEMU's digest ") and \
        "is not allowed by the operator's policy" in reason, reason
    assert f"seller sam (VM {vm}): not attested: QEMU's digest" in market.log()
    waitUntil(lambda: lease()["ended"] is not None, "the lease to end", START_TIMEOUT, processes)
    waitUntil(lambda: f"VM {vm} stopped" in sellerProc.log(), "QEMU to stop", 30, processes)

    # Charged only up to its last good quote, and nothing more afterwards.
    final = dict(lease())
    assert final["live"] is not None and final["attested"] < final["ended"], final
    billable = final["attested"] - max(final["started"], final["live"])
    most = -(-final["price"] * final["cores"] * billable // 3600)
    assert 0 < final["charged"] <= most, (final, most)
    statement = run(buyer, "statement", "--json").json()["entries"]
    charges = -sum(e["amount"] for e in statement if e["kind"] == "charge"
                   and f"VM {vm} " in e["memo"] and e["account"] == "held")
    assert charges == final["charged"], (charges, final, statement)
    # A billing interval later, still nothing more.
    time.sleep(BILLING_WAIT)
    assert lease()["charged"] == final["charged"]
