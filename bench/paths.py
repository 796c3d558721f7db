"""
VM-to-VM frames between two sellers, direct against relayed, in one run
(docs/performance.md, "Direct paths between sellers").

    .venv/bin/python bench/paths.py [--seconds S] [--pings N] [--repeats R]

Two markets side by side, each a real server, buyer program and two sellers
on loopback, and an order of two one-core VMs that lands one on each seller
(the runs alternate between them):

  direct    the server listens on a UDP port: the sellers learn their
            addresses, the market brokers their pair, and the VMs' frames
            to each other go seller to seller over the encrypted path
  relayed   the same without the UDP port: every frame goes seller ->
            market -> buyer program -> market -> seller, as before

The VMs are bench/framevm.py, which each seller starts in place of QEMU (at
idle priority, as its VM user): it speaks QEMU's stream framing on the NIC
descriptor, so its frames take exactly a VM's way through the programs,
without a guest's TCP stack under TCG (about 5 MB/s, which would hide the
path).  Typed into the first VM's console (`cpushare console`):

  latency     --pings ping-pongs of 64-byte frames, one at a time
  throughput  frames of 1500 and of 64 bytes for --seconds, as fast as the
              seller takes them; the other VM counts what arrives

and for each throughput run the bytes the market server and the buyer
program sent and received on their TCP connections (`ss -i`: what they
carried, TLS and the console's command included) and the CPU they used,
which the direct path spares them; and the CPU of all four programs (both
sellers, the server, the buyer) for each frame that arrived.  Each figure is the median
of --repeats runs (5 by default).  Results go to bench/results/paths.json.  Nothing here
asserts a speed; it needs root (the seller's VM user).
"""

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import pycdlib  # noqa: E402

import stats  # noqa: E402
from procs import (  # noqa: E402
    BIN, CLK_TCK, BenchError, cpuTicks, register, startServer,
)
from vms import Programs  # noqa: E402

SIZES = (1500, 64)
MODES = ("direct", "relayed")
FRAMEVM = os.path.join(HERE, "framevm.py")


def log(text):
    print(f"[paths] {text}", flush=True)


def tinyISO(path):
    """The smallest ISO the market takes: the frame generator boots nothing."""
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident="FRAMEVM")
    for name, data in (("/README.;1", b"frame generator\n"),
                       ("/BOOT.IMG;1", b"\xeb\xfe" + bytes(2046))):    # jmp $
        iso.add_fp(io.BytesIO(data), len(data), name)
    iso.add_eltorito("/BOOT.IMG;1", bootcatfile="/BOOT.CAT;1")
    iso.write(path)
    iso.close()


def tcpBytes(pid):
    """Bytes sent plus received on the TCP connections of process C{pid} (ss -i)."""
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    total = 0
    for line, info in zip(out[::2], out[1::2]):
        if f"pid={pid}," in line:
            total += sum(int(n) for n in re.findall(r"bytes_(?:sent|received):(\d+)", info))
    return total


class Market(Programs):
    """One market with two sellers and a buyer, and the order of two frame VMs."""

    def __init__(self, mode, folder):
        self.mode = mode
        os.makedirs(os.path.join(folder, mode))
        Programs.__init__(self, os.path.join(folder, mode))

    def start(self, iso):
        data = self.path("server-data")
        extra = ["--cpu-bench-every", "0", "--canary-every", "0"]
        if self.mode == "direct":
            extra += ["--udp-port", "0"]
        self.server, port = startServer(self.children, "server", data, extra=extra,
                                        **self.twistdOptions())
        self.logs.follow("server", self.path("server.log"))
        for home in ("sam", "sue", "bob"):
            register(self.path(home), port, data, f"bench-{home}", timeout=120)
        subprocess.run([os.path.join(BIN, "cpushare-admin"), "--data", data, "credit",
                        "bench-bob", "100"], check=True, capture_output=True)
        self.sellers = []
        for name in ("sam", "sue"):
            self.sellers.append(self.twistd(
                name, "cpushare-seller", "--home", self.path(name), "--cores", 1,
                "--memory", 512, "--accel", "tcg", "--cache-size", 50, "--qemu", FRAMEVM))
            self.logs.wait(name, r"offering \d+ cores", 60, alive=self.alive)
            if self.mode == "direct":
                self.logs.wait(name, r"mesh: candidates given", 60, alive=self.alive)
        self.buyer = self.twistd(
            "buyer", "cpushare-buyer", "--home", self.path("bob"), "--subnet", "10.79.0.0/24",
            "--socket", self.path("bob", "network.sock"), "--tap", "none")
        self.logs.wait("buyer", r"as buyer ", 60, alive=self.alive)
        self.cli("bob", "image", "upload", iso)
        placed = json.loads(self.cli("bob", "order", "place", "--image", iso, "--vms", 2,
                                     "--cores", 1, "--memory", 256, "--json"))
        self.vms = placed["vm_ids"]
        deadline = time.monotonic() + 120
        while True:
            listed = json.loads(self.cli("bob", "vms", "--json"))
            if sum(vm["state"] == "running" for vm in listed) == 2:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the frame VMs never both ran: {listed}")
            self.alive()
            time.sleep(0.5)
        if len({vm["seller"] for vm in listed}) != 2:
            raise BenchError(f"both VMs landed on one seller: {listed}")
        self.ask("peer", timeout=60, expect=r"PEER \S+ [0-9a-f:]{17}")
        if self.mode == "direct":
            deadline = time.monotonic() + 60
            while json.loads(self.cli("bob", "vms", "--paths", "--json"))[0]["state"] \
                    != "direct":
                if time.monotonic() > deadline:
                    raise BenchError("the sellers' path never went direct")
                time.sleep(0.5)
        log(f"{self.mode}: two frame VMs running on two sellers")

    def ask(self, command, timeout=120, expect=None, linger=None):
        """Type C{command} (its token added) into the first VM's console; its answer's words."""
        token = f"t{time.monotonic_ns()}"
        words = command.split()
        line = " ".join([words[0], token, *words[1:]])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            shown = self.cli("bob", "console", self.vms[0], "--linger",
                             linger or 2.0, input=(line + "\n").encode(), timeout=timeout)
            found = re.search(rf"(\w+) {token}( [^\r\n]*)?\r?\n", shown)
            if found and (expect is None or re.search(expect, found.group(0))):
                return found.group(0).split()
            self.alive()
            time.sleep(0.5)
        raise BenchError(f"the frame VM never answered {line!r}")

    def close(self):
        self.children.stopAll()
        self.logs.stop()


def measureOnce(market, args, result):
    """One latency run and one throughput run of each size on C{market}, added to C{result}."""
    words = market.ask(f"lat {args.pings}", linger=2.0 + args.pings * 0.01, expect=r"^LAT")
    median, p99, lost = int(words[2]), int(words[3]), int(words[4])
    result["latency"].append({"median_us": median, "p99_us": p99, "lost": lost})
    for size in SIZES:
        before = {name: (tcpBytes(p.pid), cpuTicks(p.pid))
                  for name, p in (("server", market.server), ("buyer", market.buyer))}
        sellersBefore = sum(cpuTicks(p.pid) for p in market.sellers)
        words = market.ask(f"tput {size} {args.seconds}", linger=args.seconds + 4,
                           expect=r"^TPUT")
        carried = {name: {"tcp_bytes": tcpBytes(p.pid) - before[name][0],
                          "cpu_seconds": (cpuTicks(p.pid) - before[name][1]) / CLK_TCK}
                   for name, p in (("server", market.server), ("buyer", market.buyer))}
        sellersCPU = (sum(cpuTicks(p.pid) for p in market.sellers) - sellersBefore) / CLK_TCK
        sent, received, seconds = int(words[3]), int(words[4]), float(words[5])
        programsCPU = sellersCPU + sum(c["cpu_seconds"] for c in carried.values())
        result["throughput"][size].append({
            "sent": sent, "received": received, "seconds": seconds,
            "frames_per_second": round(received / seconds), "mb_per_second":
            round(received * size / seconds / 1e6, 2), "carried": carried,
            "sellers_cpu_seconds": sellersCPU,
            # CPU of the four programs (both sellers, server, buyer) per frame through.
            "cpu_us_per_frame": round(programsCPU / max(1, received) * 1e6, 1)})


def medians(result):
    lat = result["latency"]
    out = {"latency_median_us": stats.median([r["median_us"] for r in lat]),
           "latency_p99_us": stats.median([r["p99_us"] for r in lat])}
    for size, runs in result["throughput"].items():
        out[f"fps_{size}"] = stats.median([r["frames_per_second"] for r in runs])
        out[f"mbps_{size}"] = stats.median([r["mb_per_second"] for r in runs])
        out[f"loss_{size}"] = round(stats.median(
            [1 - r["received"] / max(1, r["sent"]) for r in runs]), 3)
        out[f"cpu_us_per_frame_{size}"] = stats.median([r["cpu_us_per_frame"] for r in runs])
        out[f"sellers_cpu_{size}"] = stats.median([r["sellers_cpu_seconds"] for r in runs])
        for name in ("server", "buyer"):
            out[f"{name}_bytes_{size}"] = stats.median(
                [r["carried"][name]["tcp_bytes"] for r in runs])
            out[f"{name}_cpu_{size}"] = stats.median(
                [r["carried"][name]["cpu_seconds"] for r in runs])
    return out


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="each throughput run (3)")
    p.add_argument("--pings", type=int, default=200, help="ping-pongs a latency run (200)")
    p.add_argument("--repeats", type=int, default=5, help="runs of each measurement (5)")
    p.add_argument("--output", default=os.path.join(HERE, "results", "paths.json"))
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/paths.py needs root: the sellers run their VMs as their VM user")
    folder = tempfile.mkdtemp(prefix="cpushare-bench-paths-")
    os.chmod(folder, 0o755)
    iso = os.path.join(folder, "framevm.iso")
    tinyISO(iso)
    results = {mode: {"latency": [], "throughput": {size: [] for size in SIZES}}
               for mode in MODES}
    started = stats.now()
    markets = [Market(mode, folder) for mode in MODES]
    try:
        # Both markets up at once, idle but for the runs, which alternate
        # (the first mode first, then the other first), so a noisy
        # neighbour hurts both alike.
        for market in markets:
            market.start(iso)
        for repeat in range(args.repeats):
            for market in markets if repeat % 2 == 0 else markets[::-1]:
                measureOnce(market, args, results[market.mode])
                last = results[market.mode]["throughput"][1500][-1]
                log(f"{market.mode}, run {repeat + 1}: {last['frames_per_second']}"
                    " frames/s of 1500 B")
    finally:
        for market in markets:
            market.close()
        shutil.rmtree(folder, ignore_errors=True)
    for mode in MODES:
        results[mode]["medians"] = medians(results[mode])
    d, r = results["direct"]["medians"], results["relayed"]["medians"]
    summary = {
        "latency_ratio": stats.ratio(d["latency_median_us"], r["latency_median_us"]),
        **{f"throughput_ratio_{size}": stats.ratio(d[f"fps_{size}"], r[f"fps_{size}"])
           for size in SIZES},
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"started": started, "args": vars(args), "results": results,
                   "direct_over_relayed": summary, "git": stats.gitState(),
                   "cpu": stats.cpuModel()}, f, indent=2, default=str)
    print(f"{'':24} {'direct':>12} {'relayed':>12}")
    for key in d:
        print(f"{key:24} {d[key]:>12} {r[key]:>12}")
    print(f"direct/relayed: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
