"""
A Twisted client of the market driven line by line, for the integration
tests (see Driver in conftest.py).

Reads one JSON request a line on stdin, answers one JSON line on stdout,
requests in order.  It holds named client sessions made with the real
client code (cpushare.client.session); every channel a session receives is
recorded, so a test can see exactly which frames reached which session.

Requests (all take "op"; "name" names a session):
  connect  name, home, [role="cli"], [certificate=true]
           -> {ok, session, account} | {ok: false, error, message}
  link     name, channel, peer_session, peer_channel -> {ok} | error
  unlink   name, channel
  send     name, channel, frames (hex strings) -> {ok, sent}
  frames   name, [channel], count, [timeout] -> {ok, frames: {channel: [hex]}}
           (waits until count frames arrived, on channel or on all channels)
  events   name, count, [timeout] -> {ok, events: [...]} (ChannelLinked/Unlinked)
  stats    name -> {ok, links, unrouted, counters}
  close    name -> {ok, reason}
Answers for failures carry the exception's class name and the one-line
explanation the CLI would show.
"""

import json
import sys
from collections import defaultdict

from twisted.internet import defer, stdio, task
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from cpushare.client.home import Home
from cpushare.client.session import (
    ClientSession, ClientSessionFactory, endpointFor, explain, homeEndpoint,
)
from cpushare.protocol import commands


class RecordingRoutes(dict):
    """Routes that deliver every channel to the session's recorder."""

    def __init__(self, sink):
        dict.__init__(self)
        self.sink = sink

    def get(self, channel, default=None):
        return lambda payload: self.sink(channel, payload)


class DriverSession(ClientSession):
    def __init__(self, reactor, role, hello=True):
        ClientSession.__init__(self, reactor, role, hello=hello)
        # Every channel is recorded: the driver's table stands in for the routes.
        self._routes = RecordingRoutes(self.record)
        self.received = defaultdict(list)
        self.events = []

    def record(self, channel, payload):
        self.received[channel].append(payload)

    def channelLinked(self, channel, peerSession, peerChannel):
        ClientSession.channelLinked(self, channel, peerSession, peerChannel)
        self.events.append({"kind": "linked", "channel": channel,
                            "peer_session": peerSession, "peer_channel": peerChannel})

    def channelUnlinked(self, channel, reason):
        ClientSession.channelUnlinked(self, channel, reason)
        self.events.append({"kind": "unlinked", "channel": channel, "reason": reason})

    def connectionLost(self, reason):
        ClientSession.connectionLost(self, reason)
        # Multiplexer.connectionLost empties the routes; keep recording
        # nothing more, but keep what was received.


class Driver:
    def __init__(self, reactor):
        self.reactor = reactor
        self.sessions = {}
        self.where = {}

    def failed(self, failure, name):
        host, port = self.where.get(name, ("?", 0))
        return {"ok": False, "error": type(failure.value).__name__,
                "message": explain(failure, host, port)}

    async def call(self, session, name, command, **kw):
        try:
            result = await session.control.callRemote(command, **kw)
        except Exception:
            return self.failed(Failure(), name)
        return dict(result, ok=True)

    async def waitFor(self, condition, timeout):
        deadline = self.reactor.seconds() + timeout
        while not condition() and self.reactor.seconds() < deadline:
            await task.deferLater(self.reactor, 0.01, lambda: None)
        return condition()

    async def op_connect(self, name, home, role="cli", certificate=True):
        home = Home(home)
        host, port = home.server
        self.where[name] = (host, port)
        if certificate:
            endpoint = homeEndpoint(self.reactor, home)
        else:
            caPEM = home.read("ca.pem")
            endpoint = endpointFor(self.reactor, host, port, caPEM)
        factory = ClientSessionFactory(self.reactor, role, sessionClass=DriverSession)
        try:
            session = await endpoint.connect(factory)
            info = await session.ready
        except Exception:
            return self.failed(Failure(), name)
        self.sessions[name] = session
        return {"ok": True, "session": info["session"], "account": info["account"]}

    async def op_link(self, name, channel, peer_session, peer_channel):
        return await self.call(self.sessions[name], name, commands.LinkChannel,
                               channel=channel, peer_session=peer_session,
                               peer_channel=peer_channel)

    async def op_unlink(self, name, channel):
        return await self.call(self.sessions[name], name, commands.UnlinkChannel,
                               channel=channel)

    async def op_send(self, name, channel, frames):
        session = self.sessions[name]
        sent = sum(bool(session.sendFrame(channel, bytes.fromhex(f))) for f in frames)
        return {"ok": True, "sent": sent}

    async def op_frames(self, name, count, channel=None, timeout=10.0):
        session = self.sessions[name]

        def arrived():
            if channel is None:
                return sum(len(v) for v in session.received.values())
            return len(session.received.get(channel, ()))

        await self.waitFor(lambda: arrived() >= count, timeout)
        return {"ok": True, "frames": {
            str(ch): [p.hex() for p in payloads]
            for ch, payloads in sorted(session.received.items())
        }}

    async def op_events(self, name, count, timeout=10.0):
        session = self.sessions[name]
        await self.waitFor(lambda: len(session.events) >= count, timeout)
        return {"ok": True, "events": list(session.events)}

    async def op_stats(self, name):
        session = self.sessions[name]
        result = await self.call(session, name, commands.LinkStats)
        result["counters"] = session.counters.asDict()
        return result

    async def op_close(self, name):
        session = self.sessions.pop(name)
        if session.connected:
            session.transport.loseConnection()
        await session.whenLost()
        return {"ok": True, "reason": session.lostReason.getErrorMessage()}

    async def handle(self, request):
        op = request.pop("op")
        try:
            return await getattr(self, "op_" + op)(**request)
        except Exception:
            failure = Failure()
            return {"ok": False, "error": type(failure.value).__name__,
                    "message": failure.getTraceback()}


class Lines(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self, driver, done):
        self.driver = driver
        self.done = done
        self.queue = defer.succeed(None)

    def lineReceived(self, line):
        request = json.loads(line)

        async def run(_):
            answer = await self.driver.handle(request)
            self.transport.write(json.dumps(answer).encode() + b"\n")

        self.queue.addCallback(lambda _: defer.ensureDeferred(run(_)))
        self.queue.addErrback(lambda f: f.printTraceback(sys.stderr))

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(None)


def main(reactor):
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    done = defer.Deferred()
    stdio.StandardIO(Lines(Driver(reactor), done), reactor=reactor)
    return done


if __name__ == "__main__":
    task.react(main)
