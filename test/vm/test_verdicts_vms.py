"""
Verdicts with real VMs: a replicated order whose two replicas land on an
honest seller and on a cheating one (test/cheatingseller.py, whose result
port alters every result).  Their digests differ, so the market places a
third replica on a third seller in a third country, which comes online
only once the first two VMs ended (never more than two VMs at once).  The
third agrees with the honest one: both are accepted and paid, the
cheater's result is rejected, what it was charged goes back to the buyer,
its lease is rated bad and its error rate shows it; the books balance.
Real twistd processes, TLS and QEMU under TCG.
"""


import pytest

from test import cheatingseller
from test.integration.conftest import Market, waitUntil
from test.vm.test_market_vms import (
    BOOT_TIMEOUT, buildJobISO, run, startBuyer, startSeller)

# The job writes its result and powers off: its seller reports the VM
# stopped, and the next replica may boot.
JOB = """#!/bin/sh
seq 1 5000 > /tmp/answer
cpushare-result /tmp/answer
echo "result-sent status=$?"
sleep 1
poweroff -f
"""


@pytest.fixture(scope="module")
def jobISO(tmp_path_factory):
    return buildJobISO(tmp_path_factory.mktemp("verdictjob"), JOB)


def balance(home):
    return run(home, "balance", "--json").json()


def test_a_cheating_replica_is_outvoted_by_a_third_and_not_paid(processes, tmp_path, jobISO):
    market = Market(processes, tmp_path / "market", extra=["--verdict-timeout", 1800]).start()
    buyer = market.register(tmp_path / "bob", "bob")
    homes = {name: market.register(tmp_path / name, name, funds=None)
             for name in ("sam", "chet", "sue")}
    startSeller(processes, homes["sam"], 1, 512, "sam", ["--country", "IT", "--price", "3.60"])
    chet = startSeller(processes, homes["chet"], 1, 512, "chet",
                       ["--country", "DE", "--price", "3.60"], twistd=cheatingseller.TWISTD)
    startBuyer(processes, buyer, None, "10.79.0.0")
    run(buyer, "image", "upload", jobISO)
    before = balance(buyer)
    placed = run(buyer, "order", "place", "--image", jobISO, "--vms", 1, "--cores", 1,
                 "--memory", 256, "--replicas", 2, "--diverse", "country", "--json").json()
    assert placed["allocated"] == 2, placed
    orderId = placed["order"]

    def results():
        return {r["vm"]: r for r in run(buyer, "results", str(orderId), "--json").json()}

    def tieBreakWaits():
        rows = results()
        vms = {vm["vm"]: vm for vm in run(buyer, "vms", "--json").json()}
        ended = [vm for vm in placed["vm_ids"] if vms[vm]["state"] == "stopped"]
        third = [vm for vm in rows if vm not in placed["vm_ids"]]
        return third if len(ended) == 2 and third else None

    [third] = waitUntil(tieBreakWaits, "both replicas to end and a third to be asked for",
                        BOOT_TIMEOUT, processes, 1.0)
    rows = results()
    first = {rows[vm]["seller"]: rows[vm] for vm in placed["vm_ids"]}
    assert first["sam"]["sha256"] != first["chet"]["sha256"], rows
    assert {rows[vm].get("verdict") for vm in placed["vm_ids"]} == {"pending"}, rows
    assert "verdict" not in rows[third], rows      # no lease yet
    vms = {vm["vm"]: vm for vm in run(buyer, "vms", "--json").json()}
    assert "replica group 1: needs 3 sellers" in vms[third]["reason"], vms[third]

    # A third seller, in a third country, takes it.
    startSeller(processes, homes["sue"], 1, 512, "sue", ["--country", "FR", "--price", "3.60"])

    def decided():
        rows = results()
        return rows if all(r.get("verdict") not in (None, "pending") for r in rows.values()) \
            else None

    rows = waitUntil(decided, "the group's verdict", BOOT_TIMEOUT, processes, 1.0)
    verdicts = {r["seller"]: r["verdict"] for r in rows.values()}
    assert verdicts == {"sam": "accepted", "chet": "rejected", "sue": "accepted"}, rows
    assert rows[third]["sha256"] == first["sam"]["sha256"], rows

    # Every lease settled: the honest sellers are paid, the cheater is not.
    def settled():
        leases = run(buyer, "leases", "--json").json()
        return leases if leases and all("ended" in lease and lease["held"] == 0
                                         for lease in leases) else None

    leases = {lease["seller"]: lease for lease in
              waitUntil(settled, "every lease settled", BOOT_TIMEOUT, processes, 1.0)}
    for name in ("sam", "sue"):
        sheet = balance(homes[name])
        assert sheet["earnings"] == leases[name]["charged"] > 0, (name, sheet, leases)
        assert not sheet.get("awaiting_verdicts"), sheet
    cheater = balance(homes["chet"])
    assert (cheater["earnings"], cheater.get("awaiting_verdicts", 0)) == (0, 0), cheater
    assert leases["chet"]["charged"] > 0, leases
    assert leases["chet"]["rating"] == "bad", leases["chet"]
    # The buyer paid the two honest leases only.
    after = balance(buyer)
    assert before["funds"] - after["funds"] == \
        leases["sam"]["charged"] + leases["sue"]["charged"], (before, after, leases)
    listed = {s["name"]: s for s in run(buyer, "sellers", "--json").json()}
    assert (listed["chet"]["validated"], listed["chet"]["error_rate"]) == (0, 1.0), listed
    assert (listed["sam"]["validated"], listed["sam"]["error_rate"]) == (1, 0.0), listed
    books = market.admin("books")
    assert books.status == 0, books
    assert "Traceback" not in market.log() + chet.log()
