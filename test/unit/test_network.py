"""The buyer's network assembled: VM channels, the DHCP server, the TAP and the socket."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from twisted.internet import reactor as globalReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from cpushare.client.buyer import dhcp
from cpushare.client.buyer import network
from cpushare.client.buyer.network import BuyerNetwork
from cpushare.client.buyer.ports import listenUNIX
from cpushare.client.buyer.switch import Switch
from cpushare.client.buyer.tapdevice import TapUnavailable

from test.unit.test_dhcp import bootp, option, udpFrame
from test.unit.test_ports import FakeSession

BROADCAST = b"\xff" * 6
VM = bytes.fromhex("525400abcdef")


def test_a_vm_gets_an_address_and_the_buyer_can_ask_for_it(monkeypatch):
    def unavailable(self):
        raise TapUnavailable("cannot open TAP device cpushare0: this needs CAP_NET_ADMIN")

    monkeypatch.setattr(network.TapPort, "start", unavailable)
    reactor = MemoryReactorClock()
    net = BuyerNetwork(reactor, socketPath="/nonexistent/net.sock")
    net.startService()
    assert net.tap is None and "CAP_NET_ADMIN" in net.tapProblem
    [(path, factory, backlog, mode)] = [l[:4] for l in reactor.unixServers]
    assert path == "/nonexistent/net.sock" and mode == 0o600

    session = FakeSession()
    port = net.addVM(session, 7, mac=VM, name="vm 42")
    session.routes[7](udpFrame(VM, BROADCAST, bootp(dhcp.DISCOVER, VM)))
    [(channel, offer)] = session.sent
    offered = dhcp.parseDHCP(offer[42:])
    assert channel == 7 and offered.options[3] == bytes([10, 77, 0, 1])  # the TAP is the router
    session.routes[7](udpFrame(VM, BROADCAST, bootp(
        dhcp.REQUEST, VM, options=option(50, offered.yiaddr) + option(54, offered.options[54]))))
    assert net.addressOf(VM) == "10.77.0.100"
    assert net.addressOf("52:54:00:ab:cd:ef") == "10.77.0.100"

    status = net.status()
    assert status["subnet"] == "10.77.0.0/24" and status["tap"] is None
    assert [p["name"] for p in status["ports"]] == ["dhcp server", "vm 42"]
    assert status["ports"][1]["framesIn"] == 2
    assert status["leases"][0]["ip"] == "10.77.0.100"

    net.removeVM(session, 7)
    assert session.routes == {} and port not in net.switch.ports
    net.addVM(session, 8, mac=VM)
    net.stopService()
    assert net.switch.ports == {} and session.routes == {}


class StaleSocketTests(unittest.TestCase):

    @pytest.mark.slow
    def test_the_socket_of_a_dead_buyer_is_replaced(self):
        # A buyer that died left its socket and its lock behind; a new one takes over.
        folder = tempfile.mkdtemp(prefix="cpushare-test-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "net.sock")
        code = (
            "import os, sys; from twisted.internet import reactor;"
            "from cpushare.client.buyer.switch import Switch;"
            "from cpushare.client.buyer.ports import listenUNIX;"
            "listenUNIX(reactor, Switch(reactor), sys.argv[1]); os._exit(0)"
        )
        subprocess.run([sys.executable, "-c", code, path], check=True, timeout=60)
        self.assertTrue(os.path.exists(path) and os.path.lexists(path + ".lock"))
        listening = listenUNIX(globalReactor, Switch(globalReactor), path)
        self.assertTrue(os.path.exists(path))
        return listening.stopListening()


def test_without_dhcp_for_a_bridged_lan():
    net = BuyerNetwork(MemoryReactorClock(), tapName=None, dhcp=False)
    net.startService()
    session = FakeSession()
    net.addVM(session, 1, mac=VM)
    session.routes[1](udpFrame(VM, BROADCAST, bootp(dhcp.DISCOVER, VM)))
    assert session.sent == [] and net.addressOf(VM) is None
    assert net.status()["dhcp"] is None and net.status()["leases"] == []
    net.stopService()
