"""
The result channel with real VMs: a replicated order's two VMs, on two
sellers in different countries, each write a result with the livecd's
cpushare-result; the market shows each replica's digest, the sha256 of the
bytes the guest wrote, and the buyer's program saved those very bytes.
The two agree, so the group is accepted and both sellers are paid.
Real twistd processes, TLS and QEMU under TCG (two VMs at once).
"""

import hashlib
import os

import pytest

from test.integration.conftest import waitUntil
from test.vm.test_market_vms import (
    BOOT_TIMEOUT, buildJobISO, run, startBuyer, startSeller)

# What the guest job writes: `seq 1 20000`, about 107 KiB (two chunks on the wire).
ANSWER = "".join(f"{i}\n" for i in range(1, 20001)).encode()

JOB = """#!/bin/sh
seq 1 20000 > /tmp/answer
cpushare-result /tmp/answer
echo "result-sent status=$?"
"""


@pytest.fixture(scope="module")
def resultISO(tmp_path_factory):
    return buildJobISO(tmp_path_factory.mktemp("resultjob"), JOB)


def test_each_replica_reports_the_digest_of_its_result_and_the_buyer_saves_it(
        market, processes, tmp_path, resultISO):
    buyer = market.register(tmp_path / "bob", "bob")
    sellers = {}
    for name, country in (("sam", "IT"), ("sue", "DE")):
        sellers[name] = startSeller(processes, market.register(tmp_path / name, name), 1, 512,
                                    name, ["--country", country])
    buyerProc, _ = startBuyer(processes, buyer, None, "10.77.0.0")
    run(buyer, "image", "upload", resultISO)
    placed = run(buyer, "order", "place", "--image", resultISO, "--vms", 1, "--cores", 1,
                 "--memory", 256, "--replicas", 2, "--diverse", "country", "--json").json()
    assert placed["allocated"] == 2, placed
    orderId = placed["order"]

    def reported():
        rows = run(buyer, "results", str(orderId), "--json").json()
        assert all(r["state"] not in ("failed", "stopped") for r in rows), rows
        done = [r for r in rows if "sha256" in r and "saved" in r]
        return rows if len(done) == 2 else None

    rows = waitUntil(reported, "both replicas' results to be reported and saved",
                     BOOT_TIMEOUT, processes, 1.0)
    assert sorted(r["vm"] for r in rows) == sorted(placed["vm_ids"])
    assert {r["replica_group"] for r in rows} == {1}
    assert {(r["seller"], r["country"]) for r in rows} == {("sam", "IT"), ("sue", "DE")}
    for r in rows:
        assert (r["sha256"], r["size"]) == (hashlib.sha256(ANSWER).hexdigest(), len(ANSWER)), r
        assert r["saved"] == str(buyer / "results" / str(orderId) / f"{r['vm']}.result")
        with open(r["saved"], "rb") as f:
            assert f.read() == ANSWER
        assert not os.path.exists(r["saved"] + ".part")
    table = run(buyer, "results", str(orderId)).stdout
    assert hashlib.sha256(ANSWER).hexdigest() in table and "SAVED" in table
    for name, proc in sellers.items():
        assert "wrote its result" in proc.log(), name
        assert "Traceback" not in proc.log(), name
    assert "result saved in" in buyerProc.log()
    # The two agree: the group is accepted.
    def accepted():
        rows = run(buyer, "results", str(orderId), "--json").json()
        return all(r.get("verdict") == "accepted" for r in rows)

    waitUntil(accepted, "the group's verdict", BOOT_TIMEOUT, processes, 1.0)
    run(buyer, "order", "cancel", str(orderId))

    # Once their leases are settled, both sellers are paid what they charged.
    def settled():
        leases = run(buyer, "leases", "--json").json()
        return leases if len(leases) == 2 and all(
            "ended" in lease and lease["held"] == 0 for lease in leases) else None

    leases = {lease["seller"]: lease for lease in
              waitUntil(settled, "both leases settled", BOOT_TIMEOUT, processes, 1.0)}
    for name in sellers:
        sheet = run(tmp_path / name, "balance", "--json").json()
        assert sheet["earnings"] == leases[name]["charged"] > 0, (name, sheet, leases)
        assert not sheet.get("awaiting_verdicts"), sheet
    assert "Traceback" not in market.log() + buyerProc.log()
