"""
The real market with a UDP port and a real seller: the seller learns the
address the market saw its datagram come from, and the market keeps its
candidates.
"""

import json
import re

import pytest

from .conftest import LOOPBACK, Market, startSeller, waitUntil

pytestmark = pytest.mark.slow


def udpAddress(market):
    path = market.data / "udp.address"
    found = {}

    def written():
        try:
            found.update(json.loads(path.read_text()))
            return True
        except (FileNotFoundError, ValueError):
            return False

    waitUntil(written, f"{path} (the market's UDP port)", processes=market.processes)
    return found


def test_sellerLearnsItsAddress(processes, tmp_path):
    market = Market(processes, tmp_path / "market", extra=["--udp-port", "0"]).start()
    udp = udpAddress(market)
    assert 0 < udp["port"] < 65536, udp
    home = market.register(tmp_path / "seller", "seller", funds=None)
    seller = startSeller(processes, home, extra=["--udp-port", "0"])
    seller.waitConnected()
    seller.proc.waitForLog("mesh: public address ")
    learned = re.search(r"mesh: public address ([0-9.]+):(\d+) \(UDP port (\d+), ephemeral",
                        seller.proc.log())
    assert learned, seller.proc.log()
    # On loopback there is no NAT: the public address is the seller's own port.
    assert learned.group(1) == LOOPBACK
    assert learned.group(2) == learned.group(3)
    candidate = f"{LOOPBACK}:{learned.group(2)}"
    market.waitForLog(f"candidates: {candidate}")
    assert f"has the public address {candidate}" in market.log()
    market.stop()
    assert not (market.data / "udp.address").exists()


def test_marketWithoutUDP(market, processes, tmp_path):
    """A market without --udp-port: the seller says direct paths are off and sells."""
    home = market.register(tmp_path / "seller", "seller", funds=None)
    seller = startSeller(processes, home)
    seller.waitConnected()
    seller.proc.waitForLog("mesh: no direct paths: this market listens on no UDP port")
    seller.proc.waitForLog("offering ")
    assert "Traceback" not in seller.proc.log()
