"""
The client-side processes of the benchmarks (and the single-hop baseline
servers), one subcommand each.  bench/run.py starts them; they are not meant
to be run by hand, though they can be.

Every worker speaks to run.py in JSON lines: it prints C{{"event": "ready",
...}} once it is set up, answers each line C{mark} read on stdin with a line
of counters, and on C{stop} prints its result and exits.  A worker whose
stdin closes (run.py went away) exits too.

    recv   counts frames on channel 1: connected to the market (relay) or
           as a TLS server of its own (direct: the single-hop baseline)
    send   pumps frames of one size on channel 1, pacing itself with
           congested/whenDrained, to the market (linked to a recv) or
           directly to a recv
    echo   sends every frame back on the channel it came on, both on its
           market connection and on a TLS server of its own
    ping   ping-pongs frames through the relay and over the single hop, in
           alternation, and reports the round-trip times
    conns  holds many authenticated seller connections (Hello + Offer)
    probe  measures control round trips (Ping) to the market from a
           connection of its own
"""

import argparse
import json
import os
import sys
import time

from twisted.internet import defer, stdio, task
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory

from cpushare import pki
from cpushare.client.home import Home
from cpushare.client.session import connectOnce, endpointFor
from cpushare.protocol import commands
from cpushare.protocol.mux import ControlProtocol, Multiplexer

from stats import percentile

CHANNEL = 1


def emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def cpuSeconds():
    t = os.times()
    return t.user + t.system


class Commands(LineReceiver):
    """run.py's commands on stdin: one word a line."""

    delimiter = b"\n"

    def __init__(self, handlers, closed):
        self.handlers = handlers
        self.closed = closed

    def lineReceived(self, line):
        word = line.decode("ascii", "replace").strip()
        handler = self.handlers.get(word)
        if handler is None:
            emit(event="error", error=f"unknown command {word!r}")
        else:
            handler()

    def connectionLost(self, reason):
        if not self.closed.called:
            self.closed.callback(None)


def listenForCommands(reactor, handlers):
    """Read commands from stdin; fires when stdin closes."""
    closed = defer.Deferred()
    stdio.StandardIO(Commands(handlers, closed), reactor=reactor)
    return closed


# -- connections


async def connectMarket(reactor, home, role):
    """A session to the market, authenticated (Hello said)."""
    host, port = home.server
    caPEM, keyPEM, certPEM = home.credentials()
    endpoint = endpointFor(reactor, host, port, caPEM, keyPEM, certPEM)
    return await connectOnce(reactor, endpoint, role, host=host, port=port)


async def connectDirect(reactor, home, port):
    """
    A session straight to a baseline server of bench's own: the same TLS
    (the account's certificate, the market's CA), the same multiplexer, no
    Hello and no heartbeats.
    """
    caPEM, keyPEM, certPEM = home.credentials()
    host = home.server[0]
    endpoint = endpointFor(reactor, host, port, caPEM, keyPEM, certPEM)
    return await connectOnce(reactor, endpoint, "cli", hello=False, host=host, port=port)


class DirectSession(Multiplexer):
    """The server end of a single-hop baseline connection."""

    def __init__(self, reactor, onConnect):
        Multiplexer.__init__(self, reactor)
        self.onConnect = onConnect

    def makeControl(self):
        return ControlProtocol()

    def connectionMade(self):
        Multiplexer.connectionMade(self)
        self.onConnect(self)


class DirectFactory(Factory):
    noisy = False

    def __init__(self, reactor, onConnect):
        self.reactor = reactor
        self.onConnect = onConnect

    def buildProtocol(self, addr):
        return DirectSession(self.reactor, self.onConnect)


async def listenDirect(reactor, dataDir, onConnect):
    """
    A TLS server like the market's (its CA, key and certificate, the same
    TLS settings), speaking only the multiplexer.  Fires with the port.
    """

    def read(name):
        with open(os.path.join(dataDir, name), "rb") as f:
            return f.read()

    tls = pki.ServerTLS(read("ca.pem"), read("server-key.pem"), read("server.pem"))
    factory = TLSMemoryBIOFactory(tls, False, DirectFactory(reactor, onConnect))
    endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    port = await endpoint.listen(factory)
    return port.getHost().port


def closeSession(session):
    if session is not None and session.connected:
        session.transport.loseConnection()


# -- recv


async def recv(reactor, args):
    home = Home(args.home)
    frames = [0, 0]  # frames, bytes
    sessions = []

    def count(payload):
        frames[0] += 1
        frames[1] += len(payload)

    def attach(session):
        session.route(CHANNEL, count)
        sessions.append(session)

    if args.mode == "relay":
        session = await connectMarket(reactor, home, "buyer")
        attach(session)
        emit(event="ready", session=session.info["session"])
    else:
        port = await listenDirect(reactor, args.data, attach)
        emit(event="ready", port=port)

    stopped = defer.Deferred()

    def mark():
        emit(event="mark", t=time.monotonic(), frames=frames[0], bytes=frames[1],
             cpu=cpuSeconds())

    def stop():
        counters = [s.counters.asDict() for s in sessions]
        emit(event="result", frames=frames[0], bytes=frames[1], counters=counters)
        for s in sessions:
            closeSession(s)
        stopped.callback(None)

    closed = listenForCommands(reactor, {"mark": mark, "stop": stop})
    await defer.DeferredList([stopped, closed], fireOnOneCallback=True)


# -- send


async def send(reactor, args):
    home = Home(args.home)
    if args.mode == "relay":
        session = await connectMarket(reactor, home, "seller")
        await session.control.callRemote(
            commands.LinkChannel, channel=CHANNEL,
            peer_session=args.peer, peer_channel=CHANNEL,
        )
    else:
        session = await connectDirect(reactor, home, args.port)
    payload = os.urandom(args.size)
    state = {"sent": 0, "running": False, "refused": 0, "pump": None}

    async def pump():
        sendFrame = session.sendFrame
        while state["running"] and session.connected:
            # Fill our queue up to its bound, then wait until the transport
            # has taken it: the pacing a bulk sender is meant to use.
            n = 0
            while not session.congested:
                if not sendFrame(CHANNEL, payload):
                    state["refused"] += 1
                    break
                n += 1
            state["sent"] += n
            if not session.connected or state["refused"]:
                break
            await session.whenDrained()

    def go():
        state["running"] = True
        d = defer.ensureDeferred(pump())
        d.addErrback(lambda f: emit(event="error", error=f.getTraceback()))
        state["pump"] = d

    def mark():
        emit(event="mark", t=time.monotonic(), frames=state["sent"], cpu=cpuSeconds())

    stopped = defer.Deferred()

    def stop():
        state["running"] = False
        defer.ensureDeferred(finish()).addErrback(
            lambda f: emit(event="error", error=f.getTraceback())
        ).addBoth(lambda _: stopped.callback(None))

    async def finish():
        if state["pump"] is not None:
            await state["pump"]
        if session.connected:
            await session.whenDrained()
        # Let the frames in flight arrive before asking the relay to count.
        await task.deferLater(reactor, 1.0, lambda: None)
        result = {"frames": state["sent"], "refused": state["refused"],
                  "counters": session.counters.asDict()}
        if args.mode == "relay":
            stats = await session.control.callRemote(commands.LinkStats)
            result["links"] = stats["links"]
            result["unrouted"] = stats["unrouted"]
        emit(event="result", **result)
        closeSession(session)

    emit(event="ready")
    closed = listenForCommands(reactor, {"go": go, "mark": mark, "stop": stop})
    await defer.DeferredList([stopped, closed], fireOnOneCallback=True)


# -- echo and ping


async def echo(reactor, args):
    home = Home(args.home)
    sessions = []

    def attach(session):
        for channel in range(1, 9):
            session.route(
                channel, lambda payload, channel=channel: session.sendFrame(channel, payload))
        sessions.append(session)

    session = await connectMarket(reactor, home, "buyer")
    attach(session)
    port = await listenDirect(reactor, args.data, attach)
    emit(event="ready", session=session.info["session"], port=port)

    stopped = defer.Deferred()

    def stop():
        emit(event="result", counters=[s.counters.asDict() for s in sessions])
        for s in sessions:
            closeSession(s)
        stopped.callback(None)

    closed = listenForCommands(reactor, {"stop": stop})
    await defer.DeferredList([stopped, closed], fireOnOneCallback=True)


async def ping(reactor, args):
    home = Home(args.home)
    relay = await connectMarket(reactor, home, "seller")
    direct = await connectDirect(reactor, home, args.port)
    sizes = [int(s) for s in args.sizes.split(",")]
    for i, _ in enumerate(sizes):
        await relay.control.callRemote(
            commands.LinkChannel, channel=CHANNEL + i,
            peer_session=args.peer, peer_channel=CHANNEL + i,
        )
    emit(event="ready")

    waiting = {}

    def arrived(payload, key):
        d = waiting.pop(key, None)
        if d is not None:
            d.callback(time.perf_counter())

    for path, session in (("relay", relay), ("direct", direct)):
        for i, _ in enumerate(sizes):
            session.route(CHANNEL + i, lambda payload, key=(path, i): arrived(payload, key))

    async def once(path, session, i, payload):
        d = defer.Deferred()
        waiting[(path, i)] = d
        d.addTimeout(args.timeout, reactor)
        start = time.perf_counter()
        session.sendFrame(CHANNEL + i, payload)
        try:
            end = await d
        except defer.TimeoutError:
            waiting.pop((path, i), None)
            return None
        return end - start

    rtts = {f"{path}/{size}": [] for path in ("relay", "direct") for size in sizes}
    payloads = [os.urandom(size) for size in sizes]
    for n in range(args.warmup + args.count):
        for i, size in enumerate(sizes):
            # Alternate which path goes first, so neither always follows a
            # pause and neither always follows the other.
            order = (("relay", relay), ("direct", direct))
            if n % 2:
                order = order[::-1]
            for path, session in order:
                rtt = await once(path, session, i, payloads[i])
                if n >= args.warmup:
                    rtts[f"{path}/{size}"].append(rtt)  # None when lost
                if args.interval:
                    await task.deferLater(reactor, args.interval, lambda: None)
    emit(event="result", rtts=rtts)
    closeSession(relay)
    closeSession(direct)


# -- conns


async def conns(reactor, args):
    home = Home(args.home)
    host, port = home.server
    caPEM, keyPEM, certPEM = home.credentials()
    # One set of TLS options (and so one SSL context) for all connections,
    # as a process opening many connections would have.
    endpoint = endpointFor(reactor, host, port, caPEM, keyPEM, certPEM)
    sessions = []
    failures = []
    lost = [0]
    semaphore = defer.DeferredSemaphore(args.batch)
    started = time.monotonic()

    async def one():
        try:
            session = await connectOnce(reactor, endpoint, "seller", host=host, port=port)
            await session.control.callRemote(commands.Offer, cores=2, memory=1024)
        except Exception as e:
            failures.append(str(e))
            return
        sessions.append(session)
        session.whenLost().addCallback(lambda _: lost.__setitem__(0, lost[0] + 1))
        if len(sessions) % args.progress == 0:
            emit(event="progress", connected=len(sessions), failed=len(failures),
                 elapsed=time.monotonic() - started)

    await defer.DeferredList([
        semaphore.run(lambda: defer.ensureDeferred(one())) for _ in range(args.count)
    ])
    elapsed = time.monotonic() - started
    total = None
    if sessions:
        page = await sessions[0].control.callRemote(commands.ListSellers, offset=0)
        total = page["total"]
    emit(event="ready", connected=len(sessions), failed=len(failures),
         failures=sorted(set(failures))[:5], elapsed=elapsed, sellers_listed=total,
         cpu=cpuSeconds())

    stopped = defer.Deferred()

    def mark():
        # The latest heartbeat round trip of each connection, as this side
        # measured it.
        latest = sorted(s.heartbeat.samples[-1] * 1000.0 for s in sessions
                        if s.heartbeat is not None and s.heartbeat.samples)
        emit(event="mark", t=time.monotonic(), open=sum(s.connected for s in sessions),
             lost=lost[0], cpu=cpuSeconds(), heartbeat_latest_ms=percentiles(latest))

    async def serverView():
        # What the server measured: each seller's median heartbeat round trip.
        found = []
        session = next(s for s in sessions if s.connected)
        while True:
            page = await session.control.callRemote(commands.ListSellers, offset=len(found))
            found.extend(page["sellers"])
            if not page["sellers"] or len(found) >= page["total"]:
                break
        latencies = sorted(s["latency_ms"] for s in found if s.get("latency_ms") is not None)
        emit(event="sellers", listed=len(found), latency_ms=percentiles(latencies))

    def sellers():
        defer.ensureDeferred(serverView()).addErrback(
            lambda f: emit(event="error", error=f.getTraceback()))

    def stop():
        for s in sessions:
            closeSession(s)
        emit(event="result", lost=lost[0])
        stopped.callback(None)

    closed = listenForCommands(reactor, {"mark": mark, "sellers": sellers, "stop": stop})
    await defer.DeferredList([stopped, closed], fireOnOneCallback=True)


# -- probe


async def probe(reactor, args):
    session = await connectMarket(reactor, Home(args.home), "cli")
    rtts = []
    for _ in range(args.count):
        start = time.perf_counter()
        await session.control.callRemote(commands.Ping, nonce=os.urandom(16))
        rtts.append((time.perf_counter() - start) * 1000.0)
        await task.deferLater(reactor, args.interval, lambda: None)
    emit(event="result", rtt_ms=percentiles(sorted(rtts)))
    closeSession(session)


def percentiles(ordered):
    """Median, 90th and 99th percentile and maximum of sorted values."""
    if not ordered:
        return None
    pick = lambda p: percentile(ordered, p, "above")
    return {"count": len(ordered), "median": pick(50), "p90": pick(90),
            "p99": pick(99), "max": ordered[-1]}


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("recv")
    r.add_argument("--home", required=True)
    r.add_argument("--mode", choices=("relay", "direct"), required=True)
    r.add_argument("--data", help="the server's data folder (direct mode)")
    r.set_defaults(run=recv)

    s = sub.add_parser("send")
    s.add_argument("--home", required=True)
    s.add_argument("--mode", choices=("relay", "direct"), required=True)
    s.add_argument("--peer", type=int, help="the receiver's session (relay mode)")
    s.add_argument("--port", type=int, help="the receiver's port (direct mode)")
    s.add_argument("--size", type=int, required=True)
    s.set_defaults(run=send)

    e = sub.add_parser("echo")
    e.add_argument("--home", required=True)
    e.add_argument("--data", required=True)
    e.set_defaults(run=echo)

    g = sub.add_parser("ping")
    g.add_argument("--home", required=True)
    g.add_argument("--peer", type=int, required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--sizes", default="64,1500")
    g.add_argument("--count", type=int, default=1000)
    g.add_argument("--warmup", type=int, default=50)
    g.add_argument("--interval", type=float, default=0.002)
    g.add_argument("--timeout", type=float, default=2.0)
    g.set_defaults(run=ping)

    c = sub.add_parser("conns")
    c.add_argument("--home", required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--batch", type=int, default=100)
    c.add_argument("--progress", type=int, default=500)
    c.set_defaults(run=conns)

    q = sub.add_parser("probe")
    q.add_argument("--home", required=True)
    q.add_argument("--count", type=int, default=200)
    q.add_argument("--interval", type=float, default=0.02)
    q.set_defaults(run=probe)
    return p


def main(argv=None):
    args = parser().parse_args(argv)

    def start(reactor):
        return defer.ensureDeferred(args.run(reactor, args))

    task.react(start)


if __name__ == "__main__":
    main()
