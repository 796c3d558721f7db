"""
The buyer's DHCP server, on a real switch with recording fake VM ports and a
fake clock.  Requests are built by hand here, byte by byte, not with the
module's own builder.
"""

import ipaddress
import random
import struct

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cpushare.client.buyer import dhcp
from cpushare.client.buyer import frames
from cpushare.client.buyer.dhcp import (
    ACK, DISCOVER, NAK, OFFER, DEFAULT_SERVER_MAC, DHCPServer, Subnet, parseDHCP,
)
from cpushare.client.buyer.switch import IPort, Switch

BROADCAST = b"\xff" * 6
ANY = b"\x00" * 4
VM1 = bytes.fromhex("525400000001")
VM2 = bytes.fromhex("525400000002")
SERVER_IP = ipaddress.IPv4Address("10.77.0.2").packed


def checksum(data):
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def bootp(kind, mac, xid=0x2A2A2A2A, ciaddr=ANY, flags=0, options=b"", op=1, chaddr=None):
    fixed = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s", op, 1, 6, 0, xid, 0, flags, ciaddr, ANY, ANY, ANY,
        (chaddr or mac).ljust(16, b"\x00"), b"", b"",
    )
    return fixed + b"\x63\x82\x53\x63" + bytes([53, 1, kind]) + options + b"\xff"


def option(code, value):
    return bytes([code, len(value)]) + value


def udpFrame(srcMAC, dstMAC, payload, srcIP=ANY, dstIP=b"\xff" * 4, sport=68, dport=67):
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, srcIP, dstIP)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return dstMAC + srcMAC + b"\x08\x00" + header + udp


@implementer(IPort)
class VMPort:
    def __init__(self, mac):
        self.name = f"vm {mac.hex()}"
        self.mac = mac
        self.allowedSources = frozenset([mac])
        self.received = []

    def send(self, frame):
        self.received.append(frame)
        return True

    def replies(self):
        """The DHCP replies this VM got, checked down to the checksums, and forgotten."""
        out = []
        for frame in self.received:
            if frame[12:14] != b"\x08\x00" or frame[6:12] != DEFAULT_SERVER_MAC:
                continue  # another VM's broadcast
            header = frame[14:34]
            assert header[0] == 0x45 and checksum(header) == 0
            total = struct.unpack("!H", header[2:4])[0]
            udp = frame[34:14 + total]
            sport, dport, length, udpSum = struct.unpack("!HHHH", udp[:8])
            assert (sport, dport, length) == (67, 68, len(udp))
            pseudo = header[12:20] + struct.pack("!BBH", 0, 17, length)
            assert udpSum == 0 or checksum(pseudo + udp) == 0
            assert len(udp) - 8 >= 300
            message = parseDHCP(udp[8:])
            assert header[12:16] == message.options[54]  # from the server's own address
            out.append((frame[0:6], header[16:20], message))
        self.received.clear()
        return out


def network(**kw):
    clock = Clock()
    clock.advance(1000)
    switch = Switch(clock)
    server = DHCPServer(clock, switch, **kw)
    server.start()
    vms = [VMPort(VM1), VMPort(VM2)]
    for vm in vms:
        switch.attach(vm)
    return clock, switch, server, vms


def send(switch, vm, payload, **kw):
    switch.frameReceived(vm, udpFrame(vm.mac, kw.pop("dstMAC", BROADCAST), payload, **kw))


def lease(switch, server, vm, hostname=b"vm1", xid=7):
    """DISCOVER, OFFER, REQUEST, ACK: the address the VM got."""
    send(switch, vm, bootp(DISCOVER, vm.mac, xid, options=option(12, hostname)))
    [(_, _, offer)] = vm.replies()
    send(switch, vm, bootp(dhcp.REQUEST, vm.mac, xid, options=option(50, offer.yiaddr)
                           + option(54, offer.options[54]) + option(12, hostname)))
    [(_, _, ack)] = vm.replies()
    assert ack.messageType == ACK
    return ipaddress.IPv4Address(ack.yiaddr)


def test_the_server_is_a_port():
    clock, switch, server, vms = network()
    verifyObject(IPort, server)


def test_discover_offer_request_ack_and_the_lease_is_visible():
    clock, switch, server, (vm, other) = network(router="10.77.0.1", dnsServers=["10.77.0.1"])
    send(switch, vm, bootp(DISCOVER, VM1, 0x01020304,
                           options=option(12, b"worker-1") + option(55, bytes([1, 3, 6]))))
    [(dstMAC, dstIP, offer)] = vm.replies()
    assert other.replies() == []
    assert dstMAC == VM1 and dstIP == ipaddress.IPv4Address("10.77.0.100").packed
    assert offer.op == 2 and offer.xid == 0x01020304 and offer.chaddr == VM1
    assert offer.messageType == OFFER
    assert offer.yiaddr == ipaddress.IPv4Address("10.77.0.100").packed
    assert offer.options[54] == SERVER_IP
    assert offer.options[1] == bytes([255, 255, 255, 0])
    assert offer.options[3] == bytes([10, 77, 0, 1])
    assert offer.options[6] == bytes([10, 77, 0, 1])
    assert offer.options[28] == bytes([10, 77, 0, 255])
    assert struct.unpack("!I", offer.options[51])[0] == dhcp.LEASE_TIME
    assert server.leaseFor(VM1) is None  # only offered so far

    clock.advance(5)
    send(switch, vm, bootp(dhcp.REQUEST, VM1, 0x01020304,
                           options=option(50, offer.yiaddr) + option(54, SERVER_IP)
                           + option(12, b"worker-1")))
    [(dstMAC, dstIP, ack)] = vm.replies()
    assert ack.messageType == ACK and ack.yiaddr == offer.yiaddr and dstMAC == VM1
    lease = server.leaseFor("52:54:00:00:00:01")
    assert str(lease.ip) == "10.77.0.100"
    assert lease.hostname == "worker-1"
    assert lease.granted == clock.seconds()
    assert lease.expires == clock.seconds() + dhcp.LEASE_TIME
    assert server.boundLeases() == [lease]
    assert lease.asDict() == {
        "mac": "52:54:00:00:00:01", "ip": "10.77.0.100", "state": "bound",
        "hostname": "worker-1", "granted": 1005, "expires": 1005 + dhcp.LEASE_TIME,
    }
    assert server.counters.offers == 1 and server.counters.acks == 1


def test_two_vms_get_different_addresses_and_keep_them():
    clock, switch, server, (a, b) = network()
    assert lease(switch, server, a) == ipaddress.IPv4Address("10.77.0.100")
    assert lease(switch, server, b) == ipaddress.IPv4Address("10.77.0.101")
    assert lease(switch, server, a) == ipaddress.IPv4Address("10.77.0.100")


def test_a_broadcast_flag_gets_a_broadcast_reply():
    clock, switch, server, (vm, other) = network()
    send(switch, vm, bootp(DISCOVER, VM1, flags=0x8000))
    [(dstMAC, dstIP, offer)] = vm.replies()
    assert dstMAC == BROADCAST and dstIP == b"\xff" * 4
    assert len(other.replies()) == 1  # it was a broadcast


def test_renewal_by_unicast_after_an_arp_for_the_server():
    clock, switch, server, (vm, _) = network()
    address = lease(switch, server, vm)
    # The VM finds the server's MAC by ARP ...
    request = frames.arp(1, VM1, address.packed, b"\x00" * 6, SERVER_IP)
    switch.frameReceived(vm, BROADCAST + VM1 + b"\x08\x06" + request)
    [reply] = vm.received
    vm.received.clear()
    assert reply[:6] == VM1 and reply[6:12] == DEFAULT_SERVER_MAC and reply[12:14] == b"\x08\x06"
    arp = frames.parseARP(reply[14:])
    assert (arp.operation, arp.senderMAC, arp.senderIP) == (2, DEFAULT_SERVER_MAC, SERVER_IP)
    assert (arp.targetMAC, arp.targetIP) == (VM1, address.packed)
    # ... and renews there, half way through the lease.
    clock.advance(dhcp.LEASE_TIME / 2)
    send(switch, vm, bootp(dhcp.REQUEST, VM1, ciaddr=address.packed),
         dstMAC=DEFAULT_SERVER_MAC, srcIP=address.packed, dstIP=SERVER_IP)
    [(dstMAC, dstIP, ack)] = vm.replies()
    assert ack.messageType == ACK and dstIP == address.packed and dstMAC == VM1
    assert ack.options[54] == SERVER_IP and ack.ciaddr == address.packed
    assert server.leaseFor(VM1).expires == clock.seconds() + dhcp.LEASE_TIME
    assert server.leaseFor(VM1).granted == 1000


def test_arp_for_other_addresses_is_not_answered():
    clock, switch, server, (vm, _) = network()
    request = frames.arp(1, VM1, ANY, b"\x00" * 6, bytes([10, 77, 0, 1]))
    switch.frameReceived(vm, BROADCAST + VM1 + b"\x08\x06" + request)
    assert vm.received == [] and server.counters.arpReplies == 0


def test_leases_expire_and_the_mac_gets_its_address_back():
    clock, switch, server, (a, b) = network()
    first = lease(switch, server, a)
    clock.advance(dhcp.LEASE_TIME + 1)
    assert server.leaseFor(VM1) is None and server.boundLeases() == []
    assert lease(switch, server, b) != first  # never-used addresses go first
    assert lease(switch, server, a) == first


def test_release_then_come_back():
    clock, switch, server, (vm, _) = network()
    address = lease(switch, server, vm)
    send(switch, vm, bootp(dhcp.RELEASE, VM1, ciaddr=address.packed),
         dstMAC=DEFAULT_SERVER_MAC, srcIP=address.packed, dstIP=SERVER_IP)
    assert vm.replies() == []
    assert server.leaseFor(VM1) is None and server.counters.releases == 1
    assert lease(switch, server, vm) == address


def test_request_for_someone_elses_address_or_outside_the_pool_is_naked():
    clock, switch, server, (a, b) = network()
    taken = lease(switch, server, a)
    for wanted in (taken, ipaddress.IPv4Address("10.77.0.5"),
                   ipaddress.IPv4Address("192.168.1.100")):
        send(switch, b, bootp(dhcp.REQUEST, VM2, options=option(50, wanted.packed)))
        [(dstMAC, dstIP, nak)] = b.replies()
        assert nak.messageType == NAK and dstMAC == BROADCAST and nak.yiaddr == ANY
    assert server.counters.naks == 3
    assert server.leaseFor(VM1).ip == taken


def test_a_vm_keeps_its_address_across_a_restart_of_the_buyer():
    clock, switch, server, (vm, _) = network()
    address = ipaddress.IPv4Address("10.77.0.150")
    # INIT-REBOOT: no server id, the address it had.
    send(switch, vm, bootp(dhcp.REQUEST, VM1, options=option(50, address.packed)))
    [(_, _, ack)] = vm.replies()
    assert ack.messageType == ACK and server.leaseFor(VM1).ip == address


def test_a_request_to_another_server_drops_our_offer():
    one = Subnet("10.77.0.0/24", poolStart="10.77.0.100", poolEnd="10.77.0.100")
    clock, switch, server, (a, b) = network(subnet=one)
    send(switch, a, bootp(DISCOVER, VM1))
    [(_, _, offer)] = a.replies()
    send(switch, a, bootp(dhcp.REQUEST, VM1, options=option(50, offer.yiaddr)
                          + option(54, bytes([10, 77, 0, 99]))))
    assert a.replies() == [] and server.counters.ignored == 1
    assert VM1 not in server.leases
    assert lease(switch, server, b) == ipaddress.IPv4Address(offer.yiaddr)


def test_a_small_pool_runs_out_and_unclaimed_offers_come_back():
    subnet = Subnet("10.9.0.0/28", poolStart="10.9.0.10", poolEnd="10.9.0.11")
    clock, switch, server, (a, b) = network(subnet=subnet)
    c = VMPort(bytes.fromhex("525400000003"))
    switch.attach(c)
    lease(switch, server, a)
    send(switch, b, bootp(DISCOVER, VM2))  # offered, never requested
    assert len(b.replies()) == 1
    send(switch, c, bootp(DISCOVER, c.mac))
    assert c.replies() == [] and server.counters.poolExhausted == 1
    clock.advance(dhcp.OFFER_HOLD + 1)
    assert str(lease(switch, server, c)) == "10.9.0.11"


def test_decline_sets_the_address_aside():
    clock, switch, server, (a, b) = network()
    address = lease(switch, server, a)
    send(switch, a, bootp(dhcp.DECLINE, VM1, options=option(50, address.packed)))
    assert server.counters.declines == 1 and server.leaseFor(VM1) is None
    assert lease(switch, server, b) != address
    assert lease(switch, server, a) != address


def test_inform_gets_options_without_a_lease():
    clock, switch, server, (vm, _) = network(router="10.77.0.1")
    mine = bytes([10, 77, 0, 50])
    send(switch, vm, bootp(dhcp.INFORM, VM1, ciaddr=mine), srcIP=mine)
    [(_, dstIP, ack)] = vm.replies()
    assert ack.messageType == ACK and ack.yiaddr == ANY and dstIP == mine
    assert 51 not in ack.options and ack.options[3] == bytes([10, 77, 0, 1])
    assert server.boundLeases() == []


def test_requests_for_another_mac_are_ignored():
    clock, switch, server, (vm, _) = network()
    send(switch, vm, bootp(DISCOVER, VM1, chaddr=bytes.fromhex("525400999999")))
    assert vm.replies() == [] and server.counters.ignored == 1


def test_frames_for_others_are_not_looked_at():
    clock, switch, server, (vm, _) = network()
    send(switch, vm, bootp(DISCOVER, VM1), dport=53)
    send(switch, vm, b"junk", dport=67, dstMAC=VM2)
    switch.frameReceived(vm, BROADCAST + VM1 + b"\x86\xdd" + b"\x60" + b"\x00" * 60)
    assert vm.replies() == []
    assert server.counters.received == 0 and server.counters.malformed == 0


def valid():
    return udpFrame(VM1, BROADCAST, bootp(DISCOVER, VM1))


def corrupt(payload):
    return udpFrame(VM1, BROADCAST, payload)


MALFORMED = {
    "empty UDP payload": corrupt(b""),
    "truncated BOOTP": corrupt(bootp(DISCOVER, VM1)[:200]),
    "no magic cookie": corrupt(bootp(DISCOVER, VM1)[:236] + b"\x00" * 4 + b"\x35\x01\x01\xff"),
    "option past the end": corrupt(bootp(DISCOVER, VM1)[:-1] + b"\x0c\x40abc"),
    "option header cut": corrupt(bootp(DISCOVER, VM1)[:-1] + b"\x0c"),
    "no message type": corrupt(bootp(DISCOVER, VM1)[:240] + b"\xff"),
    "message type 0": corrupt(bootp(0, VM1)),
    "message type 99": corrupt(bootp(99, VM1)),
    "token ring": corrupt(b"\x01\x06" + bootp(DISCOVER, VM1)[2:]),
    "BOOTP op 7": corrupt(b"\x07" + bootp(DISCOVER, VM1)[1:]),
    "requested IP of 3 bytes": corrupt(bootp(DISCOVER, VM1, options=b"\x32\x03\x0a\x4d\x00")),
    "REQUEST without an address": corrupt(bootp(dhcp.REQUEST, VM1)),
    "bad IPv4 checksum": valid()[:24] + b"\x00\x00" + valid()[26:],
    "IPv4 total length too big": valid()[:16] + b"\x0f\xff" + valid()[18:],
    "IP version 6 in an IPv4 frame": valid()[:14] + b"\x65" + valid()[15:],
    "UDP length too big": valid()[:38] + b"\xff\xff" + valid()[40:],
    "ARP too short": BROADCAST + VM1 + b"\x08\x06" + b"\x00\x01\x08\x00",
    "ARP for another protocol": BROADCAST + VM1 + b"\x08\x06" + b"\x00\x06" + b"\x00" * 26,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_input_is_counted_and_ignored(name):
    clock, switch, server, (vm, _) = network()
    switch.frameReceived(vm, MALFORMED[name])
    assert vm.replies() == []
    assert server.counters.malformed == 1, server.lastMalformed
    assert server.lastMalformed
    lease(switch, server, vm)  # and the server still works


def test_every_truncation_and_random_corruption_is_survived():
    clock, switch, server, (vm, _) = network()
    good = valid()
    # Called directly, not through the switch, which would hide an exception.
    for cut in range(len(good)):
        server.send(good[:cut])
    rng = random.Random(3)
    for _ in range(3000):
        frame = bytearray(good)
        for _ in range(rng.randrange(1, 8)):
            frame[rng.randrange(14, len(frame))] = rng.randrange(256)
        server.send(bytes(frame))
    for _ in range(300):
        server.send(good[:42] + rng.randbytes(rng.randrange(0, 600)))
    assert server.counters.malformed > 1000
    assert len(server.leases) <= 155


def test_subnet_defaults_and_checks():
    subnet = Subnet()
    assert str(subnet.network) == "10.77.0.0/24"
    assert (str(subnet.gateway), str(subnet.server)) == ("10.77.0.1", "10.77.0.2")
    assert (str(subnet.poolStart), str(subnet.poolEnd)) == ("10.77.0.100", "10.77.0.254")
    assert str(subnet.gatewayInterface) == "10.77.0.1/24"
    small = Subnet("192.168.5.0/27")
    assert (str(small.poolStart), str(small.poolEnd)) == ("192.168.5.16", "192.168.5.30")
    with pytest.raises(ValueError, match="not a host address"):
        Subnet(gateway="10.78.0.1")
    with pytest.raises(ValueError, match="inside the pool"):
        Subnet(server="10.77.0.120")
    with pytest.raises(ValueError, match="empty"):
        Subnet(poolStart="10.77.0.200", poolEnd="10.77.0.150")
    with pytest.raises(ValueError, match="too small"):
        Subnet("10.0.0.0/30")


def test_message_round_trip():
    message = dhcp.DHCPMessage(1, 99, 0x8000, ANY, ANY, ANY, VM1,
                               {53: b"\x01", 12: b"h" * 300})
    again = parseDHCP(message.toBytes())
    assert (again.xid, again.flags, again.chaddr) == (99, 0x8000, VM1)
    assert again.options[12] == b"h" * 300  # split in two and joined again
    assert again.hostname == "h" * 63
