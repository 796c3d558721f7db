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

from ..netns import Internet, ProcessesInNamespaces, running
from .conftest import executable, waitUntil
from .test_measured_link import run, startServerIn

SELLER_PORT = 40000

# As root (CI runs as root) tools/host-deps.sh installs iproute2 and
# iptables, so there the test runs; elsewhere it cannot build namespaces.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (ip netns, veth, MASQUERADE); CI runs as root")]


class HomeBehindNAT(ProcessesInNamespaces):
    """public <-link-> router (MASQUERADE) <-link-> home (test/netns.py)."""

    def __init__(self, processes):
        ProcessesInNamespaces.__init__(self, processes, f"cpushare-{os.getpid() % 100000}-")

    def up(self):
        internet = Internet(self.net)
        home = internet.home("home", "cone")
        self.public, self.marketIP = internet.public, home.gateway
        self.home, self.homeIP, self.router, self.natIP = home[:4]



@pytest.fixture
def nat(processes):
    yield from running(HomeBehindNAT(processes))


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
