"""
The market's "where am I" datagrams: how a seller learns its public UDP
address (as the market sees it, after any NAT) and how candidates are checked.

A request (48 bytes) carries a 16-byte token the seller asked for over its
TLS connection (MeshToken); the answer (38 bytes, never longer than the
request: no amplification) echoes the token and says the address and port
the request came from:

    request: version 1 | type 16 | 0 0 | token (16) | 28 zero bytes
    answer:  version 1 | type 17 | family (4 or 6) | 0 | port (2) | token (16)
             | address (16: an IPv4 address in the first 4, zeros after)

Their types (16, 17) are apart from the direct path's (1 to 4,
L{cpushare.mesh.wire}), so one port can take both.
"""

import ipaddress
import struct

VERSION = 1
WHERE = 16
HERE = 17
TOKEN_SIZE = 16
REQUEST = struct.Struct("!BBxx16s28x")
ANSWER = struct.Struct("!BBBxH16s16s")
#: The most candidate addresses a seller may give the market.
MAX_CANDIDATES = 8

assert ANSWER.size <= REQUEST.size


def request(token):
    """The request datagram carrying C{token}."""
    return REQUEST.pack(VERSION, WHERE, token)


def parseRequest(data):
    """The token of a request datagram, or None when C{data} is not one."""
    if len(data) != REQUEST.size:
        return None
    version, kind, token = REQUEST.unpack(data)
    if version != VERSION or kind != WHERE:
        return None
    return token


def answer(token, host, port):
    """The answer to the request carrying C{token} that came from C{host}:C{port}."""
    address = publicAddress(host)
    family = 4 if address.version == 4 else 6
    return ANSWER.pack(VERSION, HERE, family, port, token, address.packed.ljust(16, b"\0"))


def parseAnswer(data):
    """(token, host, port) of an answer datagram, or None when C{data} is not one."""
    if len(data) != ANSWER.size:
        return None
    version, kind, family, port, token, packed = ANSWER.unpack(data)
    if version != VERSION or kind != HERE or not 1 <= port <= 65535:
        return None
    if family == 4 and packed[4:] == bytes(12):
        return token, str(ipaddress.IPv4Address(packed[:4])), port
    if family == 6:
        return token, str(ipaddress.IPv6Address(packed)), port
    return None


def publicAddress(host):
    """C{host} (text) as an address object: an IPv4-mapped IPv6 address as IPv4."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def checkCandidate(host, port):
    """
    A candidate address (host, port) made canonical: C{host} an IPv4 or IPv6
    literal that a peer could send to, C{port} 1 to 65535.  Raises ValueError
    naming the problem.
    """
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"candidate port {port!r} is not 1 to 65535")
    try:
        address = publicAddress(host)
    except ValueError:
        raise ValueError(f"candidate host {host[:64]!r} is not an IPv4 or IPv6 address")
    if address.is_multicast or address.is_unspecified or (
            address.version == 4 and address == ipaddress.IPv4Address("255.255.255.255")):
        raise ValueError(f"candidate host {address} is not an address of one computer")
    return str(address), port


def checkCandidates(candidates):
    """A list of (host, port) checked (L{checkCandidate}), duplicates left out."""
    if len(candidates) > MAX_CANDIDATES:
        raise ValueError(f"{len(candidates)} candidates: at most {MAX_CANDIDATES}")
    checked = []
    for host, port in candidates:
        candidate = checkCandidate(host, port)
        if candidate not in checked:
            checked.append(candidate)
    return checked
