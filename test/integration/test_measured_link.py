"""
The figures the market shows buyers, measured over a real link with a real
delay: the market in one network namespace, sellers in another, joined by
a link that delays what the sellers send by 40 ms and carries at most
20 Mbit/s from them (`tc netem delay 40ms rate 20mbit` on a veth pair, or,
on kernels built without sch_netem, the same in user space between two TAP
devices: delaylink.py).  An honest seller, and two that lie to the
measurements (lyingseller.py), must be shown no better than that link.

Needs root (network namespaces); CI runs as root.  Only addresses inside
the namespaces this test creates are used.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..netns import running
from .conftest import HEARTBEAT, SILENCE_TIMEOUT, executable, waitUntil

HERE = Path(__file__).parent
DELAY_MS = 40
RATE_MBIT = 20

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 (ip netns, veth or TAP devices, tc); CI runs as root")


def run(*argv, check=True):
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed: {result.stderr.strip()}")
    return result


class DelayedLink:
    """Two network namespaces joined by a link slow from the seller's side."""

    def __init__(self, processes):
        tag = f"{os.getpid() % 100000}"
        self.processes = processes
        self.market = f"cpushare-m{tag}"
        self.seller = f"cpushare-s{tag}"
        self.subnet = f"10.200.{os.getpid() % 250}"
        self.marketIP = f"{self.subnet}.1"
        self.sellerIP = f"{self.subnet}.2"
        self.devices = (f"cpsm{tag}", f"cpss{tag}")
        self.how = None
        self.forwarder = None

    def up(self):
        for ns in (self.market, self.seller):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        m, s = self.devices
        run("ip", "-n", self.market, "link", "add", m, "type", "veth", "peer", "name", s,
            "netns", self.seller)
        netem = run("ip", "netns", "exec", self.seller, "tc", "qdisc", "add", "dev", s,
                    "root", "netem", "delay", f"{DELAY_MS}ms", "rate", f"{RATE_MBIT}mbit",
                    check=False)
        if netem.returncode == 0:
            self.how = "tc netem"
        else:
            # No sch_netem in this kernel: the same link in user space.
            run("ip", "-n", self.market, "link", "del", m)
            self.forwarder = self.processes.start("delaylink", [
                sys.executable, HERE / "delaylink.py", m, s, 0, 0,
                DELAY_MS / 1000, RATE_MBIT * 1_000_000])
            self.forwarder.waitForLog("ready")
            run("ip", "link", "set", m, "netns", self.market)
            run("ip", "link", "set", s, "netns", self.seller)
            self.how = f"delaylink.py ({netem.stderr.strip()})"
        for ns, dev, ip in ((self.market, m, self.marketIP), (self.seller, s, self.sellerIP)):
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")

    def down(self):
        # Every process in the namespaces first, then the namespaces (and
        # with them the devices in them).
        self.processes.stopAll()
        for ns in (self.market, self.seller):
            run("ip", "netns", "del", ns, check=False)

    def start(self, ns, name, argv):
        return self.processes.start(name, ["ip", "netns", "exec", ns, *map(str, argv)])

    def cli(self, ns, home, *args):
        result = run("ip", "netns", "exec", ns, executable("cpushare"), "--home", home,
                     *args, check=False)
        assert result.returncode == 0, f"cpushare {' '.join(map(str, args))}: {result.stderr}"
        return result.stdout


def startServerIn(net, ns, data, ip, extra=()):
    """
    A market server in the namespace C{ns} of C{net} (which starts its
    processes), listening on C{ip}: (the server's process, its address).
    """
    server = net.start(ns, "server", [
        executable("twistd"), "-n", "--pidfile=", "cpushare-server", "--data", data,
        "--listen", f"tcp:0:interface={ip}", "--hostname", ip,
        "--heartbeat", HEARTBEAT, "--timeout", SILENCE_TIMEOUT, "--cpu-bench-every", "0",
        "--canary-every", "0", *extra])
    address = server.waitFor(
        lambda: (data / "server.address").exists()
        and json.loads((data / "server.address").read_text()), "the server listening")
    return server, address


@pytest.fixture
def link(processes):
    yield from running(DelayedLink(processes))


def test_the_market_shows_no_seller_nearer_or_faster_than_its_link(link, processes, tmp_path):
    data = tmp_path / "market"
    server, address = startServerIn(link, link.market, data, link.marketIP)
    where = f"{link.marketIP}:{address['port']}"

    def register(ns, name):
        home = tmp_path / name
        link.cli(ns, home, "register", "--server", where, "--ca", data / "ca.pem",
                 "--name", name)
        return home

    buyer = register(link.market, "bob")
    sam = register(link.seller, "sam")
    link.start(link.seller, "seller-sam", [
        executable("twistd"), "-n", "--pidfile=", "cpushare-seller", "--home", sam,
        "--cores", 1, "--memory", 512, "--accel", "tcg"])
    for name, mode in (("forger", "forge"), ("slowpoke", "slow")):
        home = register(link.seller, name)
        liar = link.start(link.seller, f"seller-{name}", [
            sys.executable, HERE / "lyingseller.py", home, mode])
        liar.waitForLog("offering")

    def figures():
        found = {s["name"]: s for s in json.loads(link.cli(link.market, buyer, "sellers",
                                                           "--json"))}
        if all(n in found and found[n].get("latency_ms") is not None
               and found[n].get("bandwidth_mbps") is not None
               for n in ("sam", "slowpoke")) and "forger" in found and (
                found["forger"].get("bandwidth_mbps") is not None
                or "seller forger: 16 of 16 answers to Probe" in server.log()):
            return found
        return None

    found = waitUntil(figures, f"the sellers measured over {link.how}", timeout=60,
                      processes=processes, interval=0.5)
    sam, slowpoke, forger = found["sam"], found["slowpoke"], found["forger"]
    print(f"over {link.how}: {found}")
    assert sam["latency_ms"] >= DELAY_MS, (link.how, sam)
    assert 0 < sam["bandwidth_mbps"] <= RATE_MBIT, (link.how, sam)
    # It held its heartbeats 1 s: it looks farther, and no faster.
    assert slowpoke["latency_ms"] >= 1000 + DELAY_MS, (link.how, slowpoke)
    assert 0 < slowpoke["bandwidth_mbps"] <= RATE_MBIT, (link.how, slowpoke)
    # Its answers proved nothing: no figure at all, so it fails every
    # --max-latency and --min-bandwidth screen.
    assert forger.get("latency_ms") is None, (link.how, forger)
    assert forger.get("bandwidth_mbps") is None, (link.how, forger)
    assert "ignored a heartbeat answer from" in server.log()
    assert "Traceback" not in server.log()
