"""
The cost of verdicts of replicated runs (docs/performance.md, "Verdicts").

    .venv/bin/python bench/verdicts.py [--rounds N] [--groups N] [--no-vms]

Two measurements, each against a baseline taken in the same run:

  decide   real processes (twistd cpushare-server, two cpushare-seller in
           different countries, cpushare-buyer) and real QEMU VMs under TCG:
           a job that writes a result with cpushare-result and powers off.
           The time from `order place` to the verdict of a group of two
           replicas (--replicas 2 --diverse country), against the time from
           `order place` to the result of the same job run once, in
           alternating rounds, and the market's own time from a group's
           last result to its verdict.  At most two VMs run at once.
  cost     the market's own work for one verdict: the store transaction
           that judges a group of two, moves its held earnings and counts
           its sellers (verdicts.settle), in CPU time of the market's
           process, against one bill of one lease (billing.bill), the work
           the market already does every minute for every VM; on a SQLite
           file, in this process.

Results go to bench/results/verdicts.json.  Nothing here asserts a speed:
the exit status is non-zero only when a measurement could not be taken.
The decide part needs root (the seller runs QEMU as the cpushare-vm user);
without root, or with --no-vms, only the cost is measured.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import stats  # noqa: E402
from procs import BIN, BenchError, Children, register, startServer  # noqa: E402

JOB = """#!/bin/sh
seq 1 20000 > /tmp/answer
cpushare-result /tmp/answer
echo "result-sent status=$?"
poweroff -f
"""
TIMEOUT = 600


def log(text):
    print(f"[verdicts] {text}", flush=True)


def cli(home, *args, timeout=120):
    result = subprocess.run([os.path.join(BIN, "cpushare"), "--home", home,
                             *[str(a) for a in args]],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise BenchError(f"cpushare {' '.join(map(str, args))}: {result.stderr.strip()}")
    return result.stdout


def cliJSON(home, *args):
    import json
    return json.loads(cli(home, *args, "--json"))


def waitLog(child, text, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(child.logPath, errors="replace") as f:
            if text in f.read():
                return
        if not child.alive():
            raise BenchError(f"{child.name} exited{child.tail()}")
        time.sleep(0.2)
    raise BenchError(f"{text!r} not in {child.name}'s log in {timeout}s{child.tail()}")


class Decide:
    """The processes of the decide measurement."""

    def __init__(self, folder, children):
        self.folder = folder
        self.children = children

    def path(self, *names):
        return os.path.join(self.folder, *names)

    def start(self):
        job = self.path("job")
        os.makedirs(job)
        with open(os.path.join(job, "start"), "w") as f:
            f.write(JOB)
        os.chmod(os.path.join(job, "start"), 0o755)
        open(os.path.join(job, "no-network"), "w").close()
        self.buyer = self.path("buyer")
        self.iso = self.path("job.iso")
        t = time.monotonic()
        cli(self.buyer, "image", "build", "-o", self.iso, "--add", job, "--no-ssh-key",
            timeout=900)
        log(f"built the job's livecd in {time.monotonic() - t:.1f}s")
        data = self.path("server-data")
        self.server, port = startServer(self.children, "server", data,
                                        extra=["--cpu-bench-every", "0"])
        register(self.buyer, port, data, "buyer", timeout=120)
        subprocess.run([os.path.join(BIN, "cpushare-admin"), "--data", data, "credit",
                        "buyer", "100"], check=True, capture_output=True)
        for name, country in (("it", "IT"), ("de", "DE")):
            home = self.path(name)
            register(home, port, data, name, timeout=120)
            seller = self.children.spawn(name, [
                os.path.join(BIN, "twistd"), "-n", "--pidfile=", "cpushare-seller",
                "--home", home, "--cores", 1, "--memory", 512, "--accel", "tcg",
                "--cache-size", 200, "--country", country], commands=False)
            waitLog(seller, "offering")
        buyer = self.children.spawn("buyer", [
            os.path.join(BIN, "twistd"), "-n", "--pidfile=", "cpushare-buyer",
            "--home", self.buyer, "--subnet", "10.78.0.0/24",
            "--socket", self.path("network.sock"), "--tap", "none"], commands=False)
        waitLog(buyer, "as buyer ")
        cli(self.buyer, "image", "upload", self.iso, timeout=300)

    def idle(self):
        """Until no VM of the buyer runs (the last round's powered off)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            vms = cliJSON(self.buyer, "vms")
            if all(vm["state"] in ("stopped", "failed", "lost") for vm in vms):
                return
            time.sleep(0.5)
        raise BenchError("the VMs of the last round did not end")

    def lag(self, order):
        """
        Seconds from the group's last result reaching the market to its
        verdict, as the market's own clock recorded both.
        """
        import sqlite3
        db = sqlite3.connect(f"file:{self.path('server-data', 'market.sqlite')}?mode=ro",
                             uri=True)
        try:
            (lag,) = db.execute(
                "SELECT d.decided - MAX(r.reported) FROM verdicts d JOIN results r"
                " ON r.order_id = d.order_id WHERE d.order_id = ?", (order,)).fetchone()
        finally:
            db.close()
        return lag

    def once(self, replicas):
        """Seconds from placing the order to its verdict (replicas) or its result (one VM)."""
        self.idle()
        args = ["order", "place", "--image", self.iso, "--vms", 1, "--cores", 1,
                "--memory", 256]
        if replicas:
            args += ["--replicas", 2, "--diverse", "country"]
        t = time.monotonic()
        placed = cliJSON(self.buyer, *args)
        order = placed["order"]
        deadline = t + TIMEOUT
        while time.monotonic() < deadline:
            rows = cliJSON(self.buyer, "results", order)
            if replicas:
                done = len(rows) >= 2 and all(r.get("verdict") not in (None, "pending")
                                              for r in rows)
            else:
                done = all("sha256" in r for r in rows)
            if done:
                return time.monotonic() - t, order
            self.children.check()
            time.sleep(0.25)
        raise BenchError(f"order {order} was not decided in {TIMEOUT}s")


def decide(folder, rounds):
    children = Children(folder)
    bench = Decide(folder, children)
    single, pair, lags, verdicts = [], [], [], []
    try:
        bench.start()
        for i in range(rounds):
            seconds, _ = bench.once(False)
            single.append(seconds)
            seconds, order = bench.once(True)
            pair.append(seconds)
            verdicts.append(sorted({r.get("verdict") for r in cliJSON(bench.buyer, "results",
                                                                        order)}))
            lags.append(bench.lag(order))
            log(f"round {i + 1}: one VM's result in {single[-1]:.1f}s, a pair's verdict"
                f" in {pair[-1]:.1f}s ({verdicts[-1]}), {lags[-1] * 1000:.1f} ms after its"
                " last result")
    finally:
        children.stopAll()
    return {
        "one_vm_result_s": stats.summary(single),
        "pair_verdict_s": stats.summary(pair),
        "ratio_median": stats.ratio(stats.median(pair), stats.median(single)),
        "verdict_after_last_result_ms": stats.summary([lag * 1000 for lag in lags]),
        "verdicts": verdicts,
    }


# -- the market's cost of one verdict


def cost(folder, groups):
    """CPU seconds of this process for verdicts.settle against billing.bill, per call."""
    from cpushare.server.db import leases as leasesql, marketsql, store
    from cpushare.server.db.database import fromURL
    from cpushare.server.market import verdicts
    from cpushare.server.money import billing, ledger

    path = os.path.join(folder, "cost.sqlite")
    db = fromURL(f"sqlite:///{path}").connect()
    db.transact(store.migrate)

    def setUp(cursor):
        def account(name):
            cursor.execute("INSERT INTO accounts (name, created) VALUES (?, ?) RETURNING id",
                           (name, store.now()))
            return cursor.fetchone()[0]
        buyer, a, b = account("buyer"), account("a"), account("b")
        ledger.post(cursor, "grant", "bench funds",
                    [(ledger.GRANTS, None, -10**12), (ledger.FUNDS, buyer, 10**12)])
        store.addAccountImage(cursor, buyer, "0" * 64, 1, "job.iso")
        made = []
        for g in range(groups):
            orderId, vmIds = store.createOrder(cursor, buyer, "0" * 64, 2, 1, 256)
            marketsql.setReplicas(cursor, orderId, 2, ["country"],
                                  {vmIds[0]: 1, vmIds[1]: 1})
            leases = []
            for vmId, seller in zip(vmIds, (a, b)):
                leaseId = billing.openLease(cursor, vmId, orderId, buyer, seller, "s",
                                            3_600_000, 0, 1, 0.0, verdict="pending")
                leasesql.showedLife(cursor, leaseId, 0.0)
                leases.append((vmId, leaseId, seller))
            made.append((orderId, leases))
        return made

    made = db.transact(setUp)

    def timed(fn):
        t0 = time.process_time()
        for item in made:
            db.transact(fn, item)
        return (time.process_time() - t0) / len(made)

    def billOne(cursor, item):
        for vmId, leaseId, seller in item[1][:1]:
            billing.bill(cursor, leaseId, 60.0, 0, 60.0)

    def settleOne(cursor, item):
        orderId, leases = item
        group = verdicts.Group(orderId, 1, None)
        for vmId, leaseId, seller in leases:
            group.members[vmId] = verdicts.Member(vmId, "a" * 64, leaseId, seller)
        judgement = verdicts.judge({vm: m.outcome for vm, m in group.members.items()})
        verdicts.settle(cursor, group, judgement, 120.0, "bench")

    for item in made:
        db.transact(lambda c, item=item: [billing.bill(c, lease, 30.0, 0, 30.0)
                                          for _, lease, _ in item[1]])
    bill = timed(billOne)
    settle = timed(settleOne)
    books = db.transact(ledger.books)
    db.close()
    return {
        "groups": groups,
        "bill_cpu_ms": round(bill * 1000, 3),
        "verdict_cpu_ms": round(settle * 1000, 3),
        "ratio": stats.ratio(settle, bill),
        "books_ok": bool(books["ok"]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--groups", type=int, default=300)
    parser.add_argument("--no-vms", action="store_true")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="cpushare-bench-verdicts-")
    result = {"when": stats.now(), "cpu": stats.cpuModel(), "git": stats.gitState()}
    try:
        result["cost"] = cost(folder, args.groups)
        log(f"one verdict: {result['cost']['verdict_cpu_ms']} ms of CPU, one bill:"
            f" {result['cost']['bill_cpu_ms']} ms (x{result['cost']['ratio']})")
        if args.no_vms:
            log("the decide part: skipped (--no-vms)")
        elif os.geteuid() != 0:
            log("the decide part needs root (the seller runs QEMU as cpushare-vm): skipped")
        else:
            result["decide"] = decide(folder, args.rounds)
            d = result["decide"]
            log(f"a pair decides in a median {d['pair_verdict_s']['median']}s, one VM's"
                f" result in {d['one_vm_result_s']['median']}s (x{d['ratio_median']})")
    except BenchError as e:
        log(f"failed: {e}")
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    path = stats.resultPath("verdicts")
    stats.write(path, result)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
