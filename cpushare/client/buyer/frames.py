"""
The raw ethernet, ARP, IPv4 and UDP frames the buyer's network builds and
reads for itself (the DHCP server and its ARP answers).  The switch never
looks further than the ethernet header; everything here is for the few
frames the buyer's process speaks on its own behalf.

Addresses are bytes on the wire: MACs are 6 bytes, IPv4 addresses 4 bytes.
Parsers raise L{MalformedPacket} naming what is wrong; they never raise
anything else on bad input.
"""

import struct

MAC_SIZE = 6
ETHERNET_HEADER_SIZE = 14
BROADCAST_MAC = b"\xff" * MAC_SIZE
ZERO_MAC = b"\x00" * MAC_SIZE

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806

IPPROTO_UDP = 17
IPV4_BROADCAST = b"\xff" * 4
IPV4_ANY = b"\x00" * 4

_ETHERNET = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")

ARP_REQUEST = 1
ARP_REPLY = 2


class MalformedPacket(ValueError):
    """A packet we were asked to read is not what it claims to be."""


def macToString(mac):
    return ":".join(f"{b:02x}" for b in mac)


def macFromString(text):
    """C{"02:43:50:00:00:01"} (or with dashes) as 6 bytes."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != MAC_SIZE or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None


def isGroupAddress(mac):
    """True for broadcast and multicast MACs (the I/G bit of the first octet)."""
    return bool(mac[0] & 1)


def internetChecksum(data):
    """The ones' complement sum of RFC 1071, as used by IPv4 and UDP."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst, src, ethertype, payload):
    return _ETHERNET.pack(dst, src, ethertype) + payload


def parseEthernet(frame):
    """(dst, src, ethertype, payload) of an untagged frame."""
    if len(frame) < ETHERNET_HEADER_SIZE:
        raise MalformedPacket(f"ethernet frame of {len(frame)} bytes is too short")
    dst, src, ethertype = _ETHERNET.unpack_from(frame)
    return dst, src, ethertype, frame[ETHERNET_HEADER_SIZE:]


def ipv4(src, dst, protocol, payload, ttl=64):
    """An IPv4 packet with a 20-byte header and its checksum."""
    header = _IPV4.pack(0x45, 0, 20 + len(payload), 0, 0, ttl, protocol, 0, src, dst)
    checksum = internetChecksum(header)
    return header[:10] + struct.pack("!H", checksum) + header[12:] + payload


class IPv4Packet:
    __slots__ = ("src", "dst", "protocol", "ttl", "payload")

    def __init__(self, src, dst, protocol, ttl, payload):
        self.src, self.dst, self.protocol = src, dst, protocol
        self.ttl, self.payload = ttl, payload


def parseIPv4(packet):
    if len(packet) < 20:
        raise MalformedPacket(f"IPv4 packet of {len(packet)} bytes is too short")
    (versionIHL, _tos, totalLength, _ident, fragment, ttl, protocol, _checksum,
     src, dst) = _IPV4.unpack_from(packet)
    if versionIHL >> 4 != 4:
        raise MalformedPacket(f"IP version {versionIHL >> 4}, not 4")
    headerLength = (versionIHL & 0x0F) * 4
    if headerLength < 20 or headerLength > totalLength or totalLength > len(packet):
        raise MalformedPacket(
            f"IPv4 lengths do not fit: header {headerLength}, total {totalLength}, "
            f"{len(packet)} bytes present"
        )
    if internetChecksum(packet[:headerLength]) != 0:
        raise MalformedPacket("IPv4 header checksum is wrong")
    if fragment & 0x3FFF:
        raise MalformedPacket("IPv4 fragments are not reassembled here")
    return IPv4Packet(src, dst, protocol, ttl, packet[headerLength:totalLength])


def udp(srcIP, dstIP, srcPort, dstPort, payload):
    """A UDP datagram in an IPv4 packet, both checksums computed."""
    length = 8 + len(payload)
    pseudo = srcIP + dstIP + struct.pack("!BBH", 0, IPPROTO_UDP, length)
    header = _UDP.pack(srcPort, dstPort, length, 0)
    checksum = internetChecksum(pseudo + header + payload) or 0xFFFF
    datagram = _UDP.pack(srcPort, dstPort, length, checksum) + payload
    return ipv4(srcIP, dstIP, IPPROTO_UDP, datagram)


def parseUDP(payload):
    """(srcPort, dstPort, data) of the UDP datagram in an IPv4 payload."""
    if len(payload) < 8:
        raise MalformedPacket(f"UDP datagram of {len(payload)} bytes is too short")
    srcPort, dstPort, length, _checksum = _UDP.unpack_from(payload)
    if length < 8 or length > len(payload):
        raise MalformedPacket(
            f"UDP length {length} does not fit the {len(payload)} bytes present"
        )
    return srcPort, dstPort, payload[8:length]


class ARPPacket:
    __slots__ = ("operation", "senderMAC", "senderIP", "targetMAC", "targetIP")

    def __init__(self, operation, senderMAC, senderIP, targetMAC, targetIP):
        self.operation = operation
        self.senderMAC, self.senderIP = senderMAC, senderIP
        self.targetMAC, self.targetIP = targetMAC, targetIP


def arp(operation, senderMAC, senderIP, targetMAC, targetIP):
    """An ARP packet for IPv4 over ethernet."""
    return _ARP.pack(1, ETHERTYPE_IPV4, 6, 4, operation, senderMAC, senderIP,
                     targetMAC, targetIP)


def parseARP(payload):
    if len(payload) < _ARP.size:
        raise MalformedPacket(f"ARP packet of {len(payload)} bytes is too short")
    (hardware, protocol, hardwareSize, protocolSize, operation, senderMAC, senderIP,
     targetMAC, targetIP) = _ARP.unpack_from(payload)
    if (hardware, protocol, hardwareSize, protocolSize) != (1, ETHERTYPE_IPV4, 6, 4):
        raise MalformedPacket("not an ARP packet for IPv4 over ethernet")
    return ARPPacket(operation, senderMAC, senderIP, targetMAC, targetIP)
