"""
A seller behind a NAT learns the NAT's address, not its own: the market in a
"public" namespace, the seller in a "home" namespace whose only way out is a
router namespace that masquerades (iptables MASQUERADE) what it forwards.

Needs root (network namespaces) and iptables; CI runs as root.  Only
addresses inside the namespaces this test creates are used.
"""

import os
import re

import pytest

from .conftest import executable, waitUntil
from .test_measured_link import run, startServerIn

SELLER_PORT = 40000

# As root (CI runs as root) tools/host-deps.sh installs iproute2 and
# iptables, so there the test runs; elsewhere it cannot build namespaces.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (ip netns, veth, MASQUERADE); CI runs as root")]


class HomeBehindNAT:
    """public <-veth-> router (MASQUERADE) <-veth-> home."""

    def __init__(self, processes):
        tag = f"{os.getpid() % 100000}"
        self.processes = processes
        self.public, self.router, self.home = (
            f"cpushare-pub{tag}", f"cpushare-rtr{tag}", f"cpushare-home{tag}")
        net = os.getpid() % 250
        self.marketIP, self.natIP = f"10.202.{net}.1", f"10.202.{net}.2"
        self.gatewayIP, self.homeIP = f"192.168.{net}.1", f"192.168.{net}.2"
        self.wan, self.wanPeer = f"cpw{tag}", f"cpr{tag}"
        self.lan, self.lanPeer = f"cpl{tag}", f"cph{tag}"

    def up(self):
        for ns in (self.public, self.router, self.home):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", self.public, "link", "add", self.wan, "type", "veth", "peer", "name",
            self.wanPeer, "netns", self.router)
        run("ip", "-n", self.router, "link", "add", self.lan, "type", "veth", "peer", "name",
            self.lanPeer, "netns", self.home)
        for ns, dev, ip in ((self.public, self.wan, self.marketIP),
                            (self.router, self.wanPeer, self.natIP),
                            (self.router, self.lan, self.gatewayIP),
                            (self.home, self.lanPeer, self.homeIP)):
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", self.home, "route", "add", "default", "via", self.gatewayIP)
        run("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run("ip", "netns", "exec", self.router, "iptables", "-t", "nat", "-A", "POSTROUTING",
            "-o", self.wanPeer, "-j", "MASQUERADE")

    def down(self):
        self.processes.stopAll()
        for ns in (self.public, self.router, self.home):
            run("ip", "netns", "del", ns, check=False)

    def start(self, ns, name, argv):
        return self.processes.start(name, ["ip", "netns", "exec", ns, *map(str, argv)])


@pytest.fixture
def nat(processes):
    nat = HomeBehindNAT(processes)
    try:
        nat.up()
        yield nat
    finally:
        nat.down()


def test_a_seller_behind_a_nat_learns_the_nats_address(nat, processes, tmp_path):
    data = tmp_path / "market"
    server, address = startServerIn(nat, nat.public, data, nat.marketIP, ["--udp-port", "0"])
    server.waitFor(lambda: (data / "udp.address").exists(), "the server's UDP port")
    home = tmp_path / "seller"
    registered = run("ip", "netns", "exec", nat.home, executable("cpushare"), "--home", home,
                     "register", "--server", f"{nat.marketIP}:{address['port']}",
                     "--ca", data / "ca.pem", "--name", "sam", check=False)
    assert registered.returncode == 0, registered.stderr
    seller = nat.start(nat.home, "seller", [
        executable("twistd"), "-n", "--pidfile=", "cpushare-seller", "--home", home,
        "--cores", 1, "--memory", 512, "--accel", "tcg", "--udp-port", SELLER_PORT])
    seller.waitForLog("mesh: candidates given to the market")
    learned = re.search(r"mesh: public address ([0-9.]+):(\d+) \(UDP port (\d+), open",
                        seller.log())
    assert learned, seller.log()
    assert learned.group(1) == nat.natIP, seller.log()
    assert learned.group(3) == str(SELLER_PORT)
    public = f"{nat.natIP}:{learned.group(2)}"
    waitUntil(lambda: f"candidates: {public}, {nat.homeIP}:{SELLER_PORT}" in server.log(),
              "the seller's candidates in the market's log", processes=processes)
