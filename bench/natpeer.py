"""
One process of the NAT matrix (bench/natmatrix.py, test/natlab.py), run
inside a network namespace, speaking JSON lines on its standard input and
output.  Three roles:

    natpeer.py reflect --bind ADDRESS
        The market's "where am I" answer path: the real
        L{cpushare.server.market.rendezvous.Rendezvous} on a UDP port.
        Prints {"udp_port": N}; each line "token" read prints
        {"token": HEX}, a token issued for a session of its own.

    natpeer.py end --me ID --peer ID --secret HEX --local-session N
                   --remote-session N --market HOST:PORT --token HEX
                   [--udp-port N] [--bind ADDRESS]
        One seller's end of a direct path: the real seller's
        L{cpushare.client.seller.rendezvous.MeshPort} learns the public
        address from the reflector and makes the candidates (public, then
        local) as the seller program does, then prints
        {"event": "ready", "candidates": [[host, port], ...]}.  It reads
        {"peer": [[host, port], ...], "start_at": T} (T on the
        monotonic clock all namespaces share), starts a real
        L{cpushare.mesh.path.DirectPath} at T, and prints
        {"event": "result", ...}: whether the path went direct within the
        punching time, after how long, the address it took, the path's own
        RTT and the RTTs of PINGS frames echoed by the peer over it.  Then it
        answers "stats" with the counters ({"event": "stats", ...}) until
        "stop" or the end of its input.

    natpeer.py forge --to HOST:PORT --session N --count N [--spoof HOST:PORT]
        The attacker: COUNT datagrams of random bytes and COUNT with a
        valid-looking direct-path header for session N sealed with a key of
        its own, to HOST:PORT, from its own UDP socket or, with --spoof,
        with that source address and port written in the IP header (a raw
        socket).  Listens on its own socket for a second after, and prints
        {"event": "forged", "sent": N, "bytes_back": N}.
"""

import argparse
import ipaddress
import json
import os
import socket
import struct
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import defer, stdio, task  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402

from cpushare.client.seller.rendezvous import MeshPort  # noqa: E402
from cpushare.mesh import path as meshpath, reflect, wire  # noqa: E402
from cpushare.protocol import commands  # noqa: E402
from cpushare.server.market.rendezvous import Rendezvous  # noqa: E402

#: Frames echoed over a path that went direct, and the pause between them.
PINGS = 10
PING_EVERY = 0.05
#: How long the last echo is awaited.
PING_WAIT = 2.0
_PING = struct.Struct("!4sId")


def say(document):
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


class Lines(LineReceiver):
    delimiter = b"\n"

    def __init__(self, received, ended):
        self.received, self.ended = received, ended

    def lineReceived(self, line):
        line = line.strip()
        if line:
            self.received(line.decode())

    def connectionLost(self, reason):
        self.ended()


# -- the reflector


class Session:
    """A seller's session as the market's Rendezvous sees it: an id, its public address."""

    def __init__(self, sessionId):
        self.sessionId = sessionId
        self.meshPublic = None


def reflector(reactor, args):
    rendezvous = Rendezvous(reactor)
    port = reactor.listenUDP(0, rendezvous, interface=args.bind)
    issued = [0]

    def received(line):
        if line == "token":
            issued[0] += 1
            session = Session(issued[0])
            say({"token": rendezvous.issue(session).hex()})
        else:
            say({"error": f"unknown command {line[:40]!r}"})

    done = defer.Deferred()
    stdio.StandardIO(Lines(received, lambda: done.called or done.callback(None)),
                     reactor=reactor)
    say({"udp_port": port.getHost().port})
    return done


# -- one end of a path


class Control:
    """The market's side of MeshToken and MeshCandidates, as the bench brokers them."""

    def __init__(self, token, udpPort):
        self.token, self.udpPort = token, udpPort

    def callRemote(self, command, **kw):
        if command is commands.MeshToken:
            return defer.succeed({"token": self.token, "udp_port": self.udpPort})
        if command is commands.MeshCandidates:
            return defer.succeed({})
        return defer.fail(ValueError(f"the bench's market has no {command.__name__}"))


class EndPort(MeshPort):
    """The seller's UDP port: the reflector's answers to MeshPort, the rest to the mesh."""

    def __init__(self, reactor, given, mesh, after=lambda: None):
        MeshPort.__init__(self, reactor, given)
        self.mesh = mesh
        self.after = after

    def datagramReceived(self, data, addr):
        if reflect.parseAnswer(data) is not None:
            MeshPort.datagramReceived(self, data, addr)
        else:
            self.mesh.datagramReceived(data, addr)
            # A path goes direct only on a datagram: look at once.
            self.after()


class Sender:
    """What the path sends through: the UDP port, counting datagrams and bytes."""

    def __init__(self, port):
        self.port = port
        self.datagrams = self.bytes = 0

    def sendto(self, datagram, address):
        self.port.write(datagram, address)
        self.datagrams += 1
        self.bytes += len(datagram)


class End:
    def __init__(self, reactor, args):
        self.reactor = reactor
        self.args = args
        self.mesh = meshpath.Mesh()
        self.port = EndPort(reactor, bool(args.udp_port), self.mesh, self.check)
        self.listening = reactor.listenUDP(args.udp_port, self.port, interface=args.bind)
        self.sender = Sender(self.listening)
        self.pair = wire.Pair(bytes.fromhex(args.secret), args.me, args.peer,
                              args.local_session, args.remote_session)
        self.path = None
        self.peer = []
        self.startedAt = self.directAt = None
        self.rtts = []
        self.done = defer.Deferred()
        self.finished = False
        self.reported = False

    async def ready(self, marketHost, marketPort, token):
        session = types.SimpleNamespace(control=Control(token, marketPort))
        public = await self.port.discover(session, marketHost)
        say({"event": "ready", "public": public, "candidates": self.port.candidates,
             "port": self.listening.getHost().port})

    def command(self, line):
        if line == "stats":
            self.stats()
        elif line == "stop":
            self.stop()
        else:
            order = json.loads(line)
            self.peer = [tuple(c) for c in order["peer"]]
            self.path = meshpath.DirectPath(self.reactor, self.sender, self.pair, self.peer,
                                            self.deliver)
            self.mesh.add(self.path)
            wait = max(0.0, order["start_at"] - time.monotonic())
            self.reactor.callLater(wait, self.start)

    def start(self):
        self.startedAt = time.monotonic()
        self.reactor.callLater(meshpath.PUNCH_FOR + 0.2, self.report)
        self.path.start()

    def check(self):
        if (self.directAt is None and self.startedAt is not None
                and self.path.state == meshpath.DIRECT):
            self.directAt = time.monotonic()
            self.ping(0)

    def ping(self, n):
        if n < PINGS:
            self.path.send(_PING.pack(b"PING", n, time.monotonic()))
            self.reactor.callLater(PING_EVERY, self.ping, n + 1)
        else:
            self.reactor.callLater(PING_WAIT, self.report)

    def deliver(self, frame):
        if len(frame) != _PING.size:
            return
        kind, n, sentAt = _PING.unpack(frame)
        if kind == b"PING":
            self.path.send(_PING.pack(b"PONG", n, sentAt))
        elif kind == b"PONG":
            self.rtts.append((time.monotonic() - sentAt) * 1000)
            if len(self.rtts) == PINGS:
                self.report()

    def which(self, address):
        if address is None:
            return None
        address = tuple(address)
        if self.peer and address == self.peer[0]:
            return "public"
        if address in self.peer:
            return "local"
        return "other"

    def report(self):
        if self.reported:
            return
        self.reported = True
        path = self.path
        say({"event": "result", "direct": self.directAt is not None,
             "seconds_to_direct": None if self.directAt is None
             else round(self.directAt - self.startedAt, 4),
             "state": path.state, "address": path.address,
             "address_is": self.which(path.address),
             "path_rtt_ms": None if path.rtt is None else round(path.rtt * 1000, 3),
             "ping_rtts_ms": [round(r, 3) for r in self.rtts],
             "pings_sent": PINGS if self.directAt is not None else 0,
             "started_at": self.startedAt})

    def stats(self):
        path = self.path
        say({"event": "stats", "drops": dict(self.mesh.sessions.drops),
             "ignored": self.port.ignored,
             "frames_received": path.framesReceived if path else 0,
             "datagrams_sent": self.sender.datagrams, "bytes_sent": self.sender.bytes,
             "state": path.state if path else None})

    def stop(self):
        if not self.finished:
            self.finished = True
            if self.path is not None:
                self.path.stop()
            self.done.callback(None)


async def end(reactor, args):
    e = End(reactor, args)
    stdio.StandardIO(Lines(e.command, e.stop), reactor=reactor)
    host, port = args.market.rsplit(":", 1)
    await e.ready(host, int(port), bytes.fromhex(args.token))
    await e.done


# -- the attacker


def forged(session, count):
    """C{count} datagrams of random bytes, then C{count} sealed with a wrong key."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    datagrams = [os.urandom(1 + n * 37 % wire.MAX_DATAGRAM) for n in range(count)]
    aead = ChaCha20Poly1305(os.urandom(32))
    for counter in range(count):
        header = wire.HEADER.pack(wire.VERSION, wire.DATA, session, counter)
        nonce = struct.pack("!IQ", 0, counter)
        datagrams.append(header + aead.encrypt(nonce, b"\xff" * 60, header))
    return datagrams


def spoofed(source, destination, payload):
    """An IPv4 packet carrying C{payload} in UDP from C{source} to C{destination}."""
    udp = struct.pack("!HHHH", source[1], destination[1], 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP,
                     0, ipaddress.IPv4Address(source[0]).packed,
                     ipaddress.IPv4Address(destination[0]).packed)
    return ip + udp


def address(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def forge(args):
    to = address(args.to)
    own = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    own.bind(("", 0))
    datagrams = forged(args.session, args.count)
    if args.spoof:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            for datagram in datagrams:
                raw.sendto(spoofed(address(args.spoof), to, datagram), (to[0], 0))
    else:
        for datagram in datagrams:
            own.sendto(datagram, to)
    back = 0
    own.settimeout(0.2)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            back += len(own.recv(65536))
        except socket.timeout:
            pass
        except OSError:
            pass    # an ICMP error on this socket: no bytes
    say({"event": "forged", "sent": len(datagrams), "bytes_back": back})


def parser():
    p = argparse.ArgumentParser(prog="bench/natpeer.py",
                                description="one process of the NAT matrix")
    sub = p.add_subparsers(dest="role", required=True)
    r = sub.add_parser("reflect")
    r.add_argument("--bind", required=True)
    e = sub.add_parser("end")
    e.add_argument("--me", required=True)
    e.add_argument("--peer", required=True)
    e.add_argument("--secret", required=True)
    e.add_argument("--local-session", type=int, required=True)
    e.add_argument("--remote-session", type=int, required=True)
    e.add_argument("--market", required=True)
    e.add_argument("--token", required=True)
    e.add_argument("--udp-port", type=int, default=0)
    e.add_argument("--bind", default="")
    f = sub.add_parser("forge")
    f.add_argument("--to", required=True)
    f.add_argument("--session", type=int, required=True)
    f.add_argument("--count", type=int, default=10)
    f.add_argument("--spoof")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.role == "forge":
        forge(args)
        return

    def run(reactor):
        if args.role == "reflect":
            return reflector(reactor, args)
        return defer.ensureDeferred(end(reactor, args))

    task.react(run)


if __name__ == "__main__":
    main()
