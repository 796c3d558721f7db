"""
The TAP port: on Twisted's in-memory tunnel device, then, as root (CI runs
as root, and there this test must run, not skip), on a real TAP device with
the host kernel on the other side.
"""

import errno
import fcntl
import os
import socket
import struct

import pytest
from twisted.internet import reactor as globalReactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.pair.testing import MemoryIOSystem, Tunnel
from twisted.pair.tuntap import TunnelFlags
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cpushare.client.buyer import frames
from cpushare.client.buyer import tapdevice as tap
from cpushare.client.buyer.switch import IPort, Switch
from cpushare.client.buyer.tapdevice import TapPort, TapUnavailable, explainOpenError, hasNetAdmin

BROADCAST = b"\xff" * 6
HOST = bytes.fromhex("020000000005")


@implementer(IPort)
class RecordingPort:
    def __init__(self, name="recorder"):
        self.name = name
        self.allowedSources = None
        self.received = []

    def send(self, frame):
        self.received.append(frame)
        return True


def fakeTap(address=None):
    system = MemoryIOSystem()
    system.registerSpecialDevice(b"/dev/net/tun", Tunnel)
    switch = Switch(Clock())
    recorder = RecordingPort()
    switch.attach(recorder)
    port = TapPort(MemoryReactorClock(), switch, "cpushare0", address=address, system=system)
    return system, switch, recorder, port


def test_frames_cross_the_in_memory_device_both_ways():
    system, switch, recorder, port = fakeTap()
    verifyObject(IPort, port)
    port.start()
    tunnel = system.getTunnel(port._tuntap)
    assert tunnel.tunnelMode == (TunnelFlags.IFF_TAP | TunnelFlags.IFF_NO_PI).value
    assert tunnel.requestedName.rstrip(b"\x00") == b"cpushare0"
    assert port.name == "tap cpushare0" and port.deviceName == "cpushare0"
    fromKernel = BROADCAST + HOST + b"\x08\x06" + b"\x00" * 28
    tunnel.readBuffer.append(fromKernel)
    port._tuntap.doRead()
    assert recorder.received == [fromKernel]
    toKernel = HOST + b"\x02\x00\x00\x00\x00\x09" + b"\x08\x00" + b"\x00" * 50
    switch.frameReceived(recorder, toKernel)
    assert list(tunnel.writeBuffer) == [toKernel]
    # The fake device refuses writes over 1 KiB, as a full queue would.
    switch.frameReceived(recorder, HOST + b"\x02\x00\x00\x00\x00\x09" + b"\x08\x00" + b"\x00" * 1400)
    assert switch.countersFor(port).droppedOut == 1
    port.stop()
    assert port not in switch.ports and port.send(toKernel) is False


def test_without_cap_net_admin_a_clear_message():
    system, switch, recorder, port = fakeTap()
    system.permissions = set()
    with pytest.raises(TapUnavailable, match="needs CAP_NET_ADMIN.*ip tuntap add dev cpushare0"):
        port.start()
    assert port not in switch.ports


def test_a_precreated_device_without_the_right_to_address_it_still_works(monkeypatch):
    def denied(name, interface):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(tap, "configureInterface", denied)
    system, switch, recorder, port = fakeTap(address="10.77.0.1/24")
    port.start()
    assert not port.configured and port in switch.ports


def test_other_addressing_failures_stop_the_port(monkeypatch):
    def broken(name, interface):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(tap, "configureInterface", broken)
    system, switch, recorder, port = fakeTap(address="10.77.0.1/24")
    with pytest.raises(TapUnavailable, match="cannot give TAP device .* the address 10.77.0.1/24"):
        port.start()
    assert port not in switch.ports


def test_explanations_of_open_errors():
    assert "modprobe tun" in explainOpenError("t0", OSError(errno.ENOENT, "x"))
    assert "in use by another process" in explainOpenError("t0", OSError(errno.EBUSY, "x"))
    assert "not a TAP device" in explainOpenError("t0", OSError(errno.EINVAL, "x"))
    assert "CAP_NET_ADMIN" in explainOpenError("t0", OSError(errno.EACCES, "x"))


def test_has_net_admin_reads_the_effective_capabilities(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert hasNetAdmin(str(status))
    status.write_text("Name:\tx\nCapEff:\t0000000000000400\n")
    assert not hasNetAdmin(str(status))
    assert not hasNetAdmin(str(tmp_path / "missing"))


# -- a real TAP device

def interfaceAddress(name):
    """The IPv4 address of interface C{name}, read with SIOCGIFADDR."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        result = fcntl.ioctl(sock, 0x8915, struct.pack("16s24x", name.encode()))
    return socket.inet_ntoa(result[20:24])


@implementer(IPort)
class HostPort:
    """A host on the switch at C{ip} that answers ARP for it and records the rest."""

    name = "host"
    allowedSources = frozenset([HOST])

    def __init__(self, switch, ip):
        self.switch = switch
        self.ip = socket.inet_aton(ip)
        self.received = []

    def send(self, frame):
        self.received.append(frame)
        if frame[12:14] == b"\x08\x06":
            request = frames.parseARP(frame[14:])
            if request.operation == frames.ARP_REQUEST and request.targetIP == self.ip:
                reply = frames.arp(frames.ARP_REPLY, HOST, self.ip,
                                   request.senderMAC, request.senderIP)
                self.switch.frameReceived(
                    self, frames.ethernet(request.senderMAC, HOST, frames.ETHERTYPE_ARP, reply))
        return True

    def udpPayloads(self):
        out = []
        for frame in self.received:
            if frame[:6] == HOST and frame[12:14] == b"\x08\x00":
                packet = frames.parseIPv4(frame[14:])
                if packet.protocol == frames.IPPROTO_UDP:
                    out.append((frame[6:12], frames.parseUDP(packet.payload)[2]))
        return out


class Collector(DatagramProtocol):
    def __init__(self):
        self.received = []

    def datagramReceived(self, data, address):
        self.received.append((data, address))


@pytest.mark.skipif(os.geteuid() != 0, reason="a real TAP device needs root; CI runs as root")
class RealTapTests(unittest.TestCase):

    @inlineCallbacks
    def waitFor(self, condition, what, timeout=10.0):
        for _ in range(int(timeout / 0.02)):
            if condition():
                return
            yield deferLater(globalReactor, 0.02, lambda: None)
        self.fail(f"timed out waiting for {what}")

    @inlineCallbacks
    def test_the_kernel_and_the_switch_talk_through_the_device(self):
        name = f"cpst{os.getpid() % 100000}"
        third = 100 + os.getpid() % 150
        gateway, peer = f"10.231.{third}.1", f"10.231.{third}.5"
        switch = Switch(globalReactor)
        host = HostPort(switch, peer)
        switch.attach(host)
        port = TapPort(globalReactor, switch, name, address=f"{gateway}/24")
        port.start()
        stopped = []

        def stop():
            if not stopped:
                stopped.append(True)
                return port.stop()

        self.addCleanup(stop)
        self.assertTrue(port.configured)
        self.assertEqual(interfaceAddress(name), gateway)
        with open(f"/sys/class/net/{name}/flags") as f:
            self.assertTrue(int(f.read(), 16) & 1, "the device is not up")
        with open(f"/sys/class/net/{name}/address") as f:
            tapMAC = bytes.fromhex(f.read().strip().replace(":", ""))

        # Kernel -> switch: the kernel asks for the peer by ARP, the host
        # port answers through the device, and the datagram follows.
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        sender.sendto(b"from the kernel", (peer, 9999))
        yield self.waitFor(lambda: host.udpPayloads(), "the datagram from the kernel")
        self.assertEqual(host.udpPayloads(), [(tapMAC, b"from the kernel")])
        arps = [f for f in host.received if f[12:14] == b"\x08\x06"]
        self.assertEqual(arps[0][:12], BROADCAST + tapMAC)
        self.assertIs(switch.lookup(tapMAC), port)

        # Switch -> kernel: a datagram from the host port to a socket on the gateway.
        collector = Collector()
        listening = globalReactor.listenUDP(0, collector, interface=gateway)
        self.addCleanup(listening.stopListening)
        datagram = frames.udp(socket.inet_aton(peer), socket.inet_aton(gateway),
                              9999, listening.getHost().port, b"from the switch")
        switch.frameReceived(host, frames.ethernet(tapMAC, HOST, frames.ETHERTYPE_IPV4, datagram))
        yield self.waitFor(lambda: collector.received, "the datagram from the switch")
        self.assertEqual(collector.received, [(b"from the switch", (peer, 9999))])

        counters = switch.countersFor(port)
        self.assertGreaterEqual(counters.framesIn, 2)
        self.assertGreaterEqual(counters.framesOut, 2)

        # Closing the port removes the device.
        yield stop()
        self.assertFalse(os.path.exists(f"/sys/class/net/{name}"))


def test_the_udp_port_binds_the_address_the_listen_endpoint_names():
    from cpushare.server.tap import udpInterface
    assert udpInterface("tcp:8843:interface=203.0.113.5") == "203.0.113.5"
    assert udpInterface("tcp:8843") == ""
    assert udpInterface("tcp:8843:interface=localhost") == ""
    assert udpInterface("tcp6:8843:interface=2001\\:db8\\:\\:1") == ""
