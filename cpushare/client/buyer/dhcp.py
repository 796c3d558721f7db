"""
The DHCP server of the buyer's network: a port of the buyer's switch, inside
the buyer's process, that gives each VM an address with nothing for the
buyer to configure.

The subnet (L{Subnet}, all configurable) is by default::

    10.77.0.0/24
    10.77.0.1         the gateway: the buyer's TAP device (the host kernel
                      answers ARP and ping there, and routes or NATs beyond)
    10.77.0.2         this DHCP server (it answers ARP for this address, so
                      clients can renew by unicast)
    10.77.0.100-.254  the pool handed out to VMs

Leases are keyed by the client's MAC (C{chaddr}, which must equal the
frame's source MAC, so one port cannot take leases for MACs it does not
send from).  A MAC keeps its address across renewals, releases and
restarts of the VM while nobody else needs it.  An address is taken from
the pool's never-used part first, and only when that is empty from the
lease that expired longest ago, so the table never holds more entries than
the pool has addresses.  An offer holds its address for L{OFFER_HOLD}
seconds.  A REQUEST for a free address in the pool is granted even without
an offer (a VM renewing after the buyer restarted keeps its address); one
for an address outside the pool or held by another MAC gets a NAK.

Supported: DISCOVER/OFFER, REQUEST/ACK/NAK, RELEASE, DECLINE (the address
is set aside for L{DECLINE_HOLD} seconds) and INFORM.  Relayed requests
(C{giaddr} set) are ignored: this server serves one ethernet segment.
Options sent: subnet mask, broadcast address, lease time with T1/T2, and
router, DNS servers and domain name when configured.  Replies carry a
UDP checksum.

Bad input never stops the server: an ARP or IPv4 frame addressed to the
server (its MAC or broadcast) that cannot be read, or a DHCP message that
is not one, is ignored and counted in C{counters.malformed}; the reason of
the last one is kept in C{lastMalformed}.
"""

import ipaddress
import re
import struct

from twisted.logger import Logger
from zope.interface import implementer

from cpushare.client.buyer import frames
from cpushare.client.buyer.frames import (
    BROADCAST_MAC, ETHERTYPE_ARP, ETHERTYPE_IPV4, IPPROTO_UDP, IPV4_ANY,
    IPV4_BROADCAST, MalformedPacket, macFromString, macToString,
)
from cpushare.client.buyer.switch import IPort

SERVER_PORT = 67
CLIENT_PORT = 68
MAGIC_COOKIE = b"\x63\x82\x53\x63"
BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
MIN_MESSAGE_SIZE = 300  # what BOOTP clients expect at least
BROADCAST_FLAG = 0x8000

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {
    DISCOVER: "DISCOVER", OFFER: "OFFER", REQUEST: "REQUEST", DECLINE: "DECLINE",
    ACK: "ACK", NAK: "NAK", RELEASE: "RELEASE", INFORM: "INFORM",
}

OPTION_PAD = 0
OPTION_SUBNET_MASK = 1
OPTION_ROUTER = 3
OPTION_DNS = 6
OPTION_HOSTNAME = 12
OPTION_DOMAIN = 15
OPTION_BROADCAST = 28
OPTION_REQUESTED_IP = 50
OPTION_LEASE_TIME = 51
OPTION_MESSAGE_TYPE = 53
OPTION_SERVER_ID = 54
OPTION_RENEWAL_TIME = 58
OPTION_REBINDING_TIME = 59
OPTION_END = 255

DEFAULT_NETWORK = "10.77.0.0/24"
DEFAULT_SERVER_MAC = macFromString("02:63:70:73:68:02")
LEASE_TIME = 3600
OFFER_HOLD = 60
DECLINE_HOLD = 600

_HOSTNAME_JUNK = re.compile(r"[^A-Za-z0-9._-]")


class Subnet:
    """
    The buyer's IPv4 subnet: its gateway (the TAP device's address), the
    DHCP server's address and the pool of addresses for VMs.  Unset
    addresses default to host 1, host 2 and hosts 100 up to the last one
    (or, in subnets too small for that, the upper half).
    """

    def __init__(self, network=DEFAULT_NETWORK, gateway=None, server=None,
                 poolStart=None, poolEnd=None):
        self.network = net = ipaddress.IPv4Network(network)
        if net.num_addresses < 8:
            raise ValueError(f"subnet {net} is too small for a gateway, a server and a pool")
        first = int(net.network_address)
        last = int(net.broadcast_address) - 1
        self.gateway = ipaddress.IPv4Address(gateway or first + 1)
        self.server = ipaddress.IPv4Address(server or first + 2)
        defaultStart = first + 100 if last - first >= 110 else first + net.num_addresses // 2
        self.poolStart = ipaddress.IPv4Address(poolStart or defaultStart)
        self.poolEnd = ipaddress.IPv4Address(poolEnd or last)
        for what, address in (("gateway", self.gateway), ("DHCP server", self.server),
                              ("pool start", self.poolStart), ("pool end", self.poolEnd)):
            if not first < int(address) <= last:
                raise ValueError(f"the {what} {address} is not a host address of {net}")
        if self.poolStart > self.poolEnd:
            raise ValueError(f"the pool {self.poolStart}-{self.poolEnd} is empty")
        for what, address in (("gateway", self.gateway), ("DHCP server", self.server)):
            if address in self:
                raise ValueError(f"the {what} {address} is inside the pool")

    def __contains__(self, address):
        """True if C{address} belongs to the pool."""
        return self.poolStart <= address <= self.poolEnd

    def pool(self):
        start, end = int(self.poolStart), int(self.poolEnd)
        return (ipaddress.IPv4Address(n) for n in range(start, end + 1))

    @property
    def gatewayInterface(self):
        """The gateway with its prefix, what the TAP device is given."""
        return ipaddress.IPv4Interface(f"{self.gateway}/{self.network.prefixlen}")

    def __repr__(self):
        return (f"<Subnet {self.network} gateway {self.gateway} server {self.server} "
                f"pool {self.poolStart}-{self.poolEnd}>")


class DHCPMessage:
    """A BOOTP/DHCP message; addresses are 4 bytes, options a dict of code to bytes."""

    __slots__ = ("op", "xid", "secs", "flags", "ciaddr", "yiaddr", "siaddr",
                 "giaddr", "chaddr", "options")

    def __init__(self, op, xid, flags, ciaddr, yiaddr, giaddr, chaddr, options,
                 secs=0, siaddr=IPV4_ANY):
        self.op, self.xid, self.secs, self.flags = op, xid, secs, flags
        self.ciaddr, self.yiaddr, self.siaddr, self.giaddr = ciaddr, yiaddr, siaddr, giaddr
        self.chaddr = chaddr
        self.options = options

    @property
    def messageType(self):
        value = self.options.get(OPTION_MESSAGE_TYPE)
        return value[0] if value and len(value) == 1 else None

    def address(self, code):
        """The IPv4 address in option C{code}, or None."""
        value = self.options.get(code)
        if value is None:
            return None
        if len(value) != 4:
            raise MalformedPacket(f"option {code} holds {len(value)} bytes, not an IPv4 address")
        return ipaddress.IPv4Address(value)

    @property
    def hostname(self):
        value = self.options.get(OPTION_HOSTNAME)
        if not value:
            return None
        return _HOSTNAME_JUNK.sub("", value.decode("ascii", "replace"))[:63] or None

    def toBytes(self):
        options = bytearray(MAGIC_COOKIE)
        for code, value in self.options.items():
            for start in range(0, max(len(value), 1), 255):
                chunk = value[start:start + 255]
                options += bytes((code, len(chunk))) + chunk
        options.append(OPTION_END)
        message = BOOTP.pack(self.op, 1, 6, 0, self.xid, self.secs, self.flags,
                             self.ciaddr, self.yiaddr, self.siaddr, self.giaddr,
                             self.chaddr.ljust(16, b"\x00"), b"", b"") + bytes(options)
        return message.ljust(MIN_MESSAGE_SIZE, b"\x00")


def parseDHCP(data):
    """A L{DHCPMessage} from the payload of a UDP datagram; L{MalformedPacket} if it is not one."""
    if len(data) < BOOTP.size + 4:
        raise MalformedPacket(f"DHCP message of {len(data)} bytes is too short")
    (op, htype, hlen, _hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr,
     chaddr, _sname, _file) = BOOTP.unpack_from(data)
    if op not in (1, 2):
        raise MalformedPacket(f"BOOTP op {op} is neither request nor reply")
    if htype != 1 or hlen != 6:
        raise MalformedPacket(f"hardware type {htype}/length {hlen} is not ethernet")
    if data[BOOTP.size:BOOTP.size + 4] != MAGIC_COOKIE:
        raise MalformedPacket("no DHCP magic cookie")
    options = {}
    i, end = BOOTP.size + 4, len(data)
    while i < end:
        code = data[i]
        if code == OPTION_PAD:
            i += 1
            continue
        if code == OPTION_END:
            break
        if i + 1 >= end or i + 2 + data[i + 1] > end:
            raise MalformedPacket(f"option {code} runs past the end of the message")
        length = data[i + 1]
        # A repeated option continues the first (RFC 3396).
        options[code] = options.get(code, b"") + data[i + 2:i + 2 + length]
        i += 2 + length
    message = DHCPMessage(op, xid, flags, ciaddr, yiaddr, giaddr, chaddr[:6], options,
                          secs=secs, siaddr=siaddr)
    if message.messageType not in MESSAGE_NAMES:
        raise MalformedPacket("no valid DHCP message type option")
    return message


class Lease:
    """One MAC's address.  C{state} is 'offered', 'bound' or 'released'; times are clock seconds."""

    __slots__ = ("mac", "ip", "state", "hostname", "granted", "expires")

    def __init__(self, mac, ip, state, expires, hostname=None, granted=None):
        self.mac, self.ip, self.state = mac, ip, state
        self.expires, self.hostname, self.granted = expires, hostname, granted

    def isBound(self, now):
        return self.state == "bound" and self.expires > now

    def asDict(self):
        return {"mac": macToString(self.mac), "ip": str(self.ip), "state": self.state,
                "hostname": self.hostname, "granted": self.granted, "expires": self.expires}

    def __repr__(self):
        return f"<Lease {macToString(self.mac)} {self.ip} {self.state} until {self.expires}>"


class DHCPCounters:
    __slots__ = ("received", "malformed", "ignored", "offers", "acks", "naks",
                 "releases", "declines", "informs", "poolExhausted", "arpReplies")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def asDict(self):
        return {name: getattr(self, name) for name in self.__slots__}


@implementer(IPort)
class DHCPServer:
    """
    The DHCP server, a port of C{switch} with its own MAC.  C{clock}
    provides C{IReactorTime}.  C{router} and C{dnsServers} are addresses to
    announce (None and () announce none); C{domain} a domain name or None.
    """

    log = Logger()

    def __init__(self, clock, switch, subnet=None, mac=DEFAULT_SERVER_MAC,
                 leaseTime=LEASE_TIME, router=None, dnsServers=(), domain=None):
        self.clock = clock
        self.switch = switch
        self.subnet = subnet if subnet is not None else Subnet()
        self.mac = mac
        self.allowedSources = frozenset([mac])
        self.name = "dhcp server"
        self.leaseTime = leaseTime
        self.router = ipaddress.IPv4Address(router) if router is not None else None
        self.dnsServers = tuple(ipaddress.IPv4Address(a) for a in dnsServers)
        self.domain = domain
        self.counters = DHCPCounters()
        self.lastMalformed = None
        self.leases = {}  # mac -> Lease
        self._byIP = {}  # address -> Lease
        self._unused = dict.fromkeys(self.subnet.pool())  # never handed out, in order
        self._declined = {}  # address -> clock seconds it is set aside until
        self._serverIP = self.subnet.server.packed
        self.leaseGranted = None  # called with (mac text, ip text) for each new lease

    def start(self):
        self.switch.attach(self)

    def stop(self):
        self.switch.detach(self)

    # -- the lease table, for people and for `cpushare vms`

    def leaseFor(self, mac):
        """The bound, unexpired lease of C{mac} (6 bytes or text), or None."""
        if isinstance(mac, str):
            mac = macFromString(mac)
        lease = self.leases.get(mac)
        if lease is not None and lease.isBound(self.clock.seconds()):
            return lease
        return None

    def boundLeases(self):
        now = self.clock.seconds()
        return sorted((lease for lease in self.leases.values() if lease.isBound(now)),
                      key=lambda lease: lease.ip)

    # -- IPort

    def send(self, frame):
        """A frame the switch delivers to the server."""
        if len(frame) < 14:
            return True
        dst = frame[0:6]
        if dst != self.mac and dst != BROADCAST_MAC:
            return True
        ethertype = (frame[12] << 8) | frame[13]
        try:
            if ethertype == ETHERTYPE_ARP:
                self._arpReceived(frame[6:12], frames.parseARP(frame[14:]))
            elif ethertype == ETHERTYPE_IPV4:
                packet = frames.parseIPv4(frame[14:])
                if packet.protocol == IPPROTO_UDP:
                    srcPort, dstPort, data = frames.parseUDP(packet.payload)
                    if dstPort == SERVER_PORT:
                        self.counters.received += 1
                        self._dhcpReceived(frame[6:12], parseDHCP(data))
        except MalformedPacket as e:
            self.counters.malformed += 1
            self.lastMalformed = str(e)
            self.log.debug("ignored a malformed packet from {mac}: {reason}",
                           mac=macToString(frame[6:12]), reason=str(e))
        return True

    def _arpReceived(self, src, request):
        if request.operation != frames.ARP_REQUEST or request.targetIP != self._serverIP:
            return
        reply = frames.arp(frames.ARP_REPLY, self.mac, self._serverIP,
                           request.senderMAC, request.senderIP)
        self.counters.arpReplies += 1
        self._emit(frames.ethernet(src, self.mac, ETHERTYPE_ARP, reply))

    # -- DHCP

    def _dhcpReceived(self, src, message):
        if message.op != 1:
            self.counters.ignored += 1  # a reply, from some other server
            return
        if message.chaddr != src:
            self.counters.ignored += 1
            self.log.debug("ignored DHCP for {chaddr} sent from {src}",
                           chaddr=macToString(message.chaddr), src=macToString(src))
            return
        if message.giaddr != IPV4_ANY:
            self.counters.ignored += 1
            return
        kind = message.messageType
        now = self.clock.seconds()
        self._releaseDeclined(now)
        if kind == DISCOVER:
            self._discover(message, now)
        elif kind == REQUEST:
            self._request(message, now)
        elif kind == RELEASE:
            self._release(message, now)
        elif kind == DECLINE:
            self._decline(message, now)
        elif kind == INFORM:
            self.counters.informs += 1
            self._reply(message, ACK, IPV4_ANY, lease=False)
        else:
            self.counters.ignored += 1

    def _discover(self, message, now):
        mac = message.chaddr
        address = self._allocate(mac, message.address(OPTION_REQUESTED_IP), now)
        if address is None:
            self.counters.poolExhausted += 1
            self.log.warn("no free address for {mac}: the pool {start}-{end} is in use",
                          mac=macToString(mac), start=str(self.subnet.poolStart),
                          end=str(self.subnet.poolEnd))
            return
        lease = self.leases.get(mac)
        if lease is None or lease.ip != address or not lease.isBound(now):
            self._hold(mac, address, "offered", now + OFFER_HOLD, message.hostname)
        self.counters.offers += 1
        self._reply(message, OFFER, address.packed)

    def _request(self, message, now):
        mac = message.chaddr
        serverID = message.address(OPTION_SERVER_ID)
        lease = self.leases.get(mac)
        if serverID is not None and serverID != self.subnet.server:
            # The client took another server's offer.
            self.counters.ignored += 1
            if lease is not None and lease.state == "offered":
                self._drop(lease)
            return
        requested = message.address(OPTION_REQUESTED_IP)
        if requested is None and message.ciaddr != IPV4_ANY:
            requested = ipaddress.IPv4Address(message.ciaddr)
        if requested is None:
            raise MalformedPacket("DHCP REQUEST names no address")
        if (lease is not None and lease.ip == requested) or self._isFree(requested, mac, now):
            renewal = lease is not None and lease.ip == requested and lease.isBound(now)
            bound = self._hold(mac, requested, "bound", now + self.leaseTime,
                               message.hostname or (lease.hostname if lease else None))
            if not renewal:
                bound.granted = now
                self.log.info("leased {ip} to {mac}{host}", ip=str(requested),
                              mac=macToString(mac),
                              host=f" ({bound.hostname})" if bound.hostname else "")
                if self.leaseGranted is not None:
                    self.leaseGranted(macToString(mac), str(requested))
            self.counters.acks += 1
            self._reply(message, ACK, requested.packed)
        else:
            self.counters.naks += 1
            self._reply(message, NAK, IPV4_ANY, lease=False)

    def _release(self, message, now):
        lease = self.leases.get(message.chaddr)
        if lease is not None and lease.ip.packed == message.ciaddr:
            lease.state = "released"
            lease.expires = now
            self.counters.releases += 1

    def _decline(self, message, now):
        address = message.address(OPTION_REQUESTED_IP)
        lease = self.leases.get(message.chaddr)
        if lease is None or lease.ip != address:
            self.counters.ignored += 1
            return
        self.counters.declines += 1
        self.log.warn("{mac} found {ip} already in use on the network; setting it aside",
                      mac=macToString(message.chaddr), ip=str(address))
        self._drop(lease, reuse=False)
        self._declined[address] = now + DECLINE_HOLD

    # -- the pool

    def _isFree(self, address, mac, now):
        if address not in self.subnet or address in self._declined:
            return False
        holder = self._byIP.get(address)
        return holder is None or holder.mac == mac or holder.expires <= now

    def _allocate(self, mac, requested, now):
        """The address to offer C{mac}, or None if every address is taken."""
        lease = self.leases.get(mac)
        if lease is not None:
            return lease.ip  # if another MAC had reclaimed it, this lease would be gone
        if requested is not None and self._isFree(requested, mac, now):
            return requested
        if self._unused:
            return next(iter(self._unused))
        expired = [l for l in self._byIP.values() if l.expires <= now]
        if expired:
            return min(expired, key=lambda l: l.expires).ip
        return None

    def _hold(self, mac, address, state, expires, hostname):
        """Record that C{address} is C{mac}'s, taking it from whoever held it."""
        lease = self.leases.get(mac)
        if lease is not None and lease.ip != address:
            self._drop(lease)
            lease = None
        holder = self._byIP.get(address)
        if holder is not None and holder.mac != mac:
            self._drop(holder, reuse=False)
        self._unused.pop(address, None)
        if lease is None:
            lease = Lease(mac, address, state, expires, hostname)
            self.leases[mac] = lease
            self._byIP[address] = lease
        lease.state, lease.expires = state, expires
        if hostname:
            lease.hostname = hostname
        return lease

    def _drop(self, lease, reuse=True):
        del self.leases[lease.mac]
        del self._byIP[lease.ip]
        if reuse:
            self._unused[lease.ip] = None

    def _releaseDeclined(self, now):
        for address, until in list(self._declined.items()):
            if until <= now:
                del self._declined[address]
                self._unused[address] = None

    # -- replies

    def _reply(self, request, kind, yiaddr, lease=True):
        subnet = self.subnet
        options = {OPTION_MESSAGE_TYPE: bytes([kind]), OPTION_SERVER_ID: self._serverIP}
        if kind != NAK:
            options[OPTION_SUBNET_MASK] = subnet.network.netmask.packed
            options[OPTION_BROADCAST] = subnet.network.broadcast_address.packed
            if lease:
                options[OPTION_LEASE_TIME] = struct.pack("!I", self.leaseTime)
                options[OPTION_RENEWAL_TIME] = struct.pack("!I", self.leaseTime // 2)
                options[OPTION_REBINDING_TIME] = struct.pack("!I", self.leaseTime * 7 // 8)
            if self.router is not None:
                options[OPTION_ROUTER] = self.router.packed
            if self.dnsServers:
                options[OPTION_DNS] = b"".join(a.packed for a in self.dnsServers)
            if self.domain:
                options[OPTION_DOMAIN] = self.domain.encode("ascii")
        ciaddr = request.ciaddr if kind == ACK else IPV4_ANY
        reply = DHCPMessage(2, request.xid, request.flags, ciaddr, yiaddr,
                            request.giaddr, request.chaddr, options)
        if kind == NAK or (request.flags & BROADCAST_FLAG and request.ciaddr == IPV4_ANY):
            dstMAC, dstIP = BROADCAST_MAC, IPV4_BROADCAST
        elif request.ciaddr != IPV4_ANY:
            dstMAC, dstIP = request.chaddr, request.ciaddr
        else:
            dstMAC, dstIP = request.chaddr, yiaddr
        datagram = frames.udp(self._serverIP, dstIP, SERVER_PORT, CLIENT_PORT, reply.toBytes())
        self._emit(frames.ethernet(dstMAC, self.mac, ETHERTYPE_IPV4, datagram))

    def _emit(self, frame):
        self.switch.frameReceived(self, frame)
