"""
The multiplexed stream carried inside each client's one TLS connection.

After the TLS handshake each side sends a greeting line::

    CPUSHARE/<protocol version> <software>\\n

and checks the other's: a different protocol version closes the connection
with an error naming both versions.  Everything after the greeting is a
sequence of messages, each an 8-byte header and a payload::

    channel: uint32, big-endian
    length:  uint32, big-endian (at most MAX_PAYLOAD)
    payload: length bytes

Channel 0 carries control: a byte stream (the payload boundaries mean
nothing) that holds Twisted AMP boxes.  Every other channel carries opaque
datagrams, one ethernet frame per message.

Flow control: the multiplexer is the push producer of its transport.  While
the transport's buffer is full, messages wait in a queue of our own.
Control data is never dropped: if a peer lets more than CONTROL_QUEUE_LIMIT
bytes pile up, we stop reading from it until it catches up.  Frames are
dropped, and counted, as a switch drops frames on a congested port, and
fairly: the channels (on a seller's connection, one per VM, of different
buyers) share the queue.  While the transport is full, one channel never
holds more than CHANNEL_QUEUE_LIMIT bytes of it, so a channel that floods
loses its own frames first; once more than FRAME_QUEUE_LIMIT bytes wait in
all, a channel's frames are only taken while it holds less than
CHANNEL_RESERVE.  (Within one reactor turn, before anything is written, a
sender may queue up to FRAME_QUEUE_LIMIT on one channel: C{congested}
tells a bulk sender when to wait.)
The queue is bounded by FRAME_QUEUE_LIMIT plus CHANNEL_RESERVE a channel.

While control is paused that way, what the peer still sends is held, at
most HELD_INPUT_LIMIT bytes (a transport stops reading once paused, so an
honest peer never comes near it), and the AMP parser stops after the box
at hand.  The AMP boxes themselves are bounded (L{ControlProtocol}): at
most MAX_BOX_KEYS keys, MAX_BOX_BYTES bytes, keys of MAX_KEY_LENGTH and
values of MAX_VALUE_LENGTH bytes; at most MAX_IN_FLIGHT requests of one
peer are answered at a time, the excess refused with an error.  And a
connection reads at most MAX_BOXES_PER_TURN boxes in one turn of the
reactor before it lets the other connections have theirs: a peer that
pipelines thousands of requests delays its own answers, not everybody's.
"""

import re
import struct
from types import MappingProxyType

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

import cpushare
from cpushare.protocol.arguments import BadArgument, checkArguments, show

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!II")
HEADER_SIZE = HEADER.size
CONTROL_CHANNEL = 0
MAX_CHANNEL = 2**32 - 1
MAX_PAYLOAD = 65535
MAX_GREETING = 128
FRAME_QUEUE_LIMIT = 256 * 1024
CHANNEL_QUEUE_LIMIT = 128 * 1024
CHANNEL_RESERVE = 16 * 1024
CONTROL_QUEUE_LIMIT = 1024 * 1024
CLOSE_TIMEOUT = 10.0
HELD_INPUT_LIMIT = 256 * 1024
MAX_BOX_KEYS = 64
MAX_BOX_BYTES = 256 * 1024
MAX_KEY_LENGTH = 255
MAX_VALUE_LENGTH = 65535
MAX_IN_FLIGHT = 16
MAX_BOXES_PER_TURN = 8
BAD_INPUT_LOG_INTERVAL = 60.0
BAD_REQUEST_CODE = b"BAD_REQUEST"

_GREETING = re.compile(rb"CPUSHARE/([0-9]{1,6}) ([\x21-\x7e]{1,64})\Z")


class ProtocolError(Exception):
    """The peer broke the wire protocol; the connection is closed."""


class VersionMismatch(ProtocolError):
    """The peer speaks another version of the protocol."""


def greeting(software=None):
    software = software or f"cpushare/{cpushare.__version__}"
    return b"CPUSHARE/%d %s\n" % (PROTOCOL_VERSION, software.encode("ascii"))


def encode(channel, payload):
    """One message as bytes: for tests and tools, not the hot path."""
    return HEADER.pack(channel, len(payload)) + payload


class MuxCounters:
    """What crossed one multiplexed connection, in messages and bytes."""

    __slots__ = (
        "framesIn", "bytesIn", "framesOut", "bytesOut",
        "droppedFull", "droppedUnrouted",
    )

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def asDict(self):
        return {name: getattr(self, name) for name in self.__slots__}


@implementer(ITransport)
class ControlTransport:
    """
    The transport the control protocol (AMP) writes to: channel 0 of a
    multiplexer.
    """

    disconnecting = False

    def __init__(self, mux):
        self._mux = mux

    def write(self, data):
        self._mux.sendControl(data)

    def writeSequence(self, seq):
        self._mux.sendControl(b"".join(seq))

    def loseConnection(self):
        # AMP gives up on its peer (for instance a box it cannot parse).
        self._mux.protocolError("malformed control message")

    def abortConnection(self):
        self._mux.protocolError("control protocol aborted the connection")

    def getPeer(self):
        return self._mux.transport.getPeer()

    def getHost(self):
        return self._mux.transport.getHost()


class _ProducingTransport:
    """
    The multiplexer's view of its transport.  A TLS transport closes only
    once its producer is unregistered, so closing through this view
    unregisters the multiplexer first, whoever asks for the close; and
    what the multiplexer still holds is written first, so a close never
    loses a message sent before it.
    """

    def __init__(self, transport, mux):
        self._transport = transport
        self._mux = mux

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def loseConnection(self):
        self._mux._writeAll()
        self._transport.unregisterProducer()
        self._transport.loseConnection()

    def abortConnection(self):
        self._transport.abortConnection()


class Routing:
    """
    Where a connection's frames go, by channel: a callable taking the
    payload.  The routes change only through L{route} and L{unroute};
    C{routes} is a read-only view of them.  The multiplexer reads its own
    dict once per C{dataReceived}, so a frame costs one dict lookup.
    """

    def __init__(self):
        self._routes = {}

    @property
    def routes(self):
        """The routes now, read-only: {channel: callable}."""
        return MappingProxyType(self._routes)

    def route(self, channel, handler):
        """Deliver the frames of C{channel} to C{handler} (replacing any route it had)."""
        self._routes[channel] = handler

    def unroute(self, channel, handler=None):
        """
        Drop the route of C{channel}, or only when it is C{handler} if given
        (compared with ==, as bound methods are); returns whether one went.
        """
        routes = self._routes
        if channel not in routes or (handler is not None and routes[channel] != handler):
            return False
        del routes[channel]
        return True


@implementer(IPushProducer)
class Multiplexer(Protocol, Routing):
    """
    One side of a multiplexed connection.

    Subclasses provide C{makeControl()} (an AMP protocol for channel 0) and
    may override C{greetingReceived}.  Frames on other channels are routed
    as L{Routing} says: C{route(channel, handler)} with a callable taking
    the payload; frames on a channel with no route are dropped and counted.
    """

    log = Logger()
    software = None

    def __init__(self, reactor):
        self.reactor = reactor
        self._routes = {}
        self.counters = MuxCounters()
        self.control = None
        self.peerVersion = None
        self.peerSoftware = None
        self.closeReason = None
        self.lastReceived = None
        self.connected = False
        self._greeted = False
        self._buffer = b""
        self._out = []
        self._queued = 0
        self._perChannel = {}       # frame bytes queued, by channel
        self._writePaused = False
        self._readPaused = False
        self._flushCall = None
        self._closing = False
        self._ignoring = False      # ignoreInput(): nothing more the peer sends is read
        self._closeTimeout = None
        self._drainWaiters = []
        self._resumeCall = None
        self._turnPaused = False
        self._transportPaused = False

    # -- Protocol

    def makeConnection(self, transport):
        Protocol.makeConnection(self, _ProducingTransport(transport, self))

    def connectionMade(self):
        self.connected = True
        self.lastReceived = self.reactor.seconds()
        # We already gather what is queued in one reactor turn into one
        # write.  Nagle's algorithm would hold a small write back until the
        # peer acknowledges the last one, which a delayed ACK makes 40 ms or
        # more: see docs/performance.md.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        self.transport.registerProducer(self, True)
        self.transport.write(greeting(self.software))
        self.control = self.makeControl()
        self.control.makeConnection(ControlTransport(self))

    def makeControl(self):
        raise NotImplementedError

    def greetingReceived(self, version, software):
        """The peer's greeting matched our protocol version."""

    def ignoreInput(self):
        """Read nothing more the peer sends on any channel; what was read stands."""
        self._ignoring = True
        self._buffer = b""

    def dataReceived(self, data):
        if self._closing or self._ignoring:
            return
        self.lastReceived = self.reactor.seconds()
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if self._readPaused or self._turnPaused:
            self._holdInput(data)
            return
        offset = 0
        if not self._greeted:
            offset = self._readGreeting(data)
            if offset is None:
                return
        n = len(data)
        unpack = HEADER.unpack_from
        routes = self._routes
        counters = self.counters
        while n - offset >= HEADER_SIZE:
            channel, length = unpack(data, offset)
            if length > MAX_PAYLOAD:
                self.protocolError(
                    f"message of {length} bytes on channel {channel} is larger "
                    f"than the limit of {MAX_PAYLOAD}"
                )
                return
            start = offset + HEADER_SIZE
            end = start + length
            if end > n:
                break
            payload = data[start:end]
            offset = end
            if channel == CONTROL_CHANNEL:
                self.control.dataReceived(payload)
                if self._closing:
                    return
                if self._readPaused or self._turnPaused:
                    # The peer is not reading our answers, or has had its
                    # turn: its further requests wait.
                    self._holdInput(data[offset:])
                    return
            else:
                counters.framesIn += 1
                counters.bytesIn += length
                route = routes.get(channel)
                if route is None:
                    counters.droppedUnrouted += 1
                else:
                    route(payload)
        if offset < n:
            self._buffer = data[offset:]

    def _holdInput(self, data):
        if len(data) > HELD_INPUT_LIMIT:
            self.protocolError(
                f"the peer sent more than {HELD_INPUT_LIMIT} bytes while not "
                f"reading the answers it asked for"
            )
            return
        self._buffer = data

    def _resumeInput(self):
        """Our control queue drained, or a new turn came: go on with the input we held."""
        self._resumeCall = None
        if self._closing or self._readPaused or self._turnPaused or self.control is None:
            return
        self.control.resumeInput()
        if self._closing or self._readPaused or self._turnPaused or self.control.paused:
            return
        if self._buffer:
            self.dataReceived(b"")

    def yieldTurn(self):
        """
        The control protocol read its share of boxes for this reactor turn:
        read no more from this peer until the next one.
        """
        if self._turnPaused or self._closing:
            return
        self._turnPaused = True
        self._setReading()
        self.reactor.callLater(0, self._nextTurn)

    def _nextTurn(self):
        self._turnPaused = False
        if self._closing:
            return
        if self.control is not None:
            self.control.newTurn()
        self._setReading()
        self._resumeInput()

    def _setReading(self):
        """Pause or resume reading from the transport, as our state wants."""
        paused = self._readPaused or self._turnPaused
        if paused != self._transportPaused and not self._closing \
                and not getattr(self.transport, "disconnecting", False):
            self._transportPaused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    @property
    def controlBacklogged(self):
        """True while the peer owes us reading more than CONTROL_QUEUE_LIMIT bytes."""
        return self._readPaused

    def bufferedBytes(self):
        """
        Bytes this connection holds for its peer, both ways: input not yet
        parsed, the control box being read, and output not yet written.
        """
        held = len(self._buffer) + self._queued
        if self.control is not None:
            held += self.control.bufferedBytes()
        return held

    def _readGreeting(self, data):
        magic = b"CPUSHARE/"
        end = data.find(b"\n", 0, MAX_GREETING)
        if not (data.startswith(magic) or magic.startswith(data)) or (
            end < 0 and len(data) >= MAX_GREETING
        ):
            self.protocolError(
                f"the peer is not speaking the CPUShare protocol "
                f"(it sent {data[:32]!r})"
            )
            return None
        if end < 0:
            self._buffer = data
            return None
        match = _GREETING.match(data[:end])
        if match is None:
            self.protocolError(
                f"the peer's greeting is not a CPUShare greeting: {data[:end][:64]!r}"
            )
            return None
        version = int(match.group(1))
        software = match.group(2).decode("ascii")
        self.peerVersion, self.peerSoftware = version, software
        if version != PROTOCOL_VERSION:
            self.protocolError(
                f"the peer ({software}) speaks CPUShare protocol version "
                f"{version}; this side speaks version {PROTOCOL_VERSION}",
                VersionMismatch,
                graceful=True,
            )
            return None
        self._greeted = True
        self.greetingReceived(version, software)
        if self._closing:
            return None
        return end + 1

    def protocolError(self, reason, kind=ProtocolError, graceful=False):
        """
        Close this connection because the peer broke the protocol; everything
        else keeps running.
        """
        if self._closing:
            return
        self._closing = True
        self.closeReason = kind(reason)
        self.log.warn(
            "closing connection {peer}: {reason}",
            peer=self.describePeer(), reason=reason,
        )
        if graceful:
            # Closing writes what we already queued (our greeting) first.
            self.transport.loseConnection()
            self._closeTimeout = self.reactor.callLater(
                CLOSE_TIMEOUT, self.transport.abortConnection
            )
        else:
            self.transport.abortConnection()

    def describePeer(self):
        try:
            peer = self.transport.getPeer()
            return f"{peer.host}:{peer.port}"
        except Exception:
            return "?"

    def connectionLost(self, reason):
        self.connected = False
        self._closing = True
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        if self._closeTimeout is not None and self._closeTimeout.active():
            self._closeTimeout.cancel()
        if self._resumeCall is not None and self._resumeCall.active():
            self._resumeCall.cancel()
        self._resumeCall = None
        self._buffer = b""
        self._out = []
        self._queued = 0
        self._perChannel.clear()
        self._routes = {}
        self._drained()
        if self.control is not None:
            self.control.connectionLost(reason)

    # -- sending

    def sendFrame(self, channel, payload):
        """
        Queue one frame on C{channel}.  Returns False (and counts a drop)
        when the outbound queue is past its bound or the connection is gone.
        """
        held = self._perChannel.get(channel, 0)
        if self._closing or (self._writePaused and held >= CHANNEL_QUEUE_LIMIT) or \
                (self._queued > FRAME_QUEUE_LIMIT and held >= CHANNEL_RESERVE):
            self.counters.droppedFull += 1
            return False
        n = len(payload)
        self._out.append(HEADER.pack(channel, n))
        self._out.append(payload)
        self._queued += HEADER_SIZE + n
        self._perChannel[channel] = held + HEADER_SIZE + n
        self.counters.framesOut += 1
        self.counters.bytesOut += n
        if self._flushCall is None and not self._writePaused:
            self._flushCall = self.reactor.callLater(0, self._flush)
        return True

    def sendControl(self, data):
        """Queue control bytes; they are never dropped."""
        if self._closing:
            return
        for start in range(0, len(data), MAX_PAYLOAD):
            chunk = data[start:start + MAX_PAYLOAD]
            self._out.append(HEADER.pack(CONTROL_CHANNEL, len(chunk)))
            self._out.append(chunk)
            self._queued += HEADER_SIZE + len(chunk)
        if self._queued > CONTROL_QUEUE_LIMIT and not self._readPaused:
            # The peer is not reading what we owe it; stop reading its
            # requests until it catches up.
            self._readPaused = True
            self._setReading()
        if self._flushCall is None and not self._writePaused:
            self._flushCall = self.reactor.callLater(0, self._flush)

    def _writeAll(self):
        """Hand everything queued to the transport now, even while it is full."""
        if self._out and self.connected:
            data = b"".join(self._out)
            self._out = []
            self._queued = 0
            self._perChannel.clear()
            self.transport.write(data)

    def _flush(self):
        self._flushCall = None
        if self._writePaused or not self._out or not self.connected:
            return
        self._writeAll()
        if not self._writePaused:
            if self._readPaused:
                self._readPaused = False
                self._setReading()
                if self._resumeCall is None:
                    self._resumeCall = self.reactor.callLater(0, self._resumeInput)
            if self._drainWaiters:
                self._drained()

    @property
    def congested(self):
        """True while frames sent now would wait in (or be dropped from) our queue."""
        return self._writePaused or self._queued > FRAME_QUEUE_LIMIT

    def whenDrained(self):
        """
        A Deferred that fires once the transport has taken what we queued
        and asks for more: how a sender of bulk frames paces itself.
        """
        d = Deferred()
        if not self.congested and not self._out:
            d.callback(None)
        else:
            self._drainWaiters.append(d)
        return d

    def _drained(self):
        waiters, self._drainWaiters = self._drainWaiters, []
        for d in waiters:
            d.callback(None)

    # -- IPushProducer, called by the transport about our writes

    def pauseProducing(self):
        self._writePaused = True

    def resumeProducing(self):
        self._writePaused = False
        if self._out:
            self._flush()
        if not self._writePaused and self._drainWaiters:
            self._drained()

    def stopProducing(self):
        self._writePaused = True


class ControlProtocol(amp.AMP):
    """
    AMP on channel 0.  The multiplexer logs connections once; AMP's own
    per-connection log lines would only repeat it.

    Every peer may be hostile, so: a box is bounded (MAX_BOX_KEYS keys,
    MAX_BOX_BYTES bytes in all, keys of MAX_KEY_LENGTH bytes) and a peer
    that sends a larger one is disconnected; each command's arguments are
    checked against their types (L{cpushare.protocol.arguments}) before its
    responder runs, and a bad one answered with an error naming it; at
    most C{maxInFlight} commands are answered at a time, the excess
    refused; answers to questions never asked are ignored.  Each of these
    is logged, one line per connection at most every
    BAD_INPUT_LOG_INTERVAL seconds, never with a traceback.
    """

    _MAX_KEY_LENGTH = MAX_KEY_LENGTH
    _MAX_VALUE_LENGTH = MAX_VALUE_LENGTH
    MAX_LENGTH = MAX_KEY_LENGTH
    maxInFlight = MAX_IN_FLIGHT
    log = Logger()

    _mux = None
    _boxKeys = 0
    _boxBytes = 0
    _refused = False
    inFlight = 0
    badInputs = 0
    _turnBoxes = 0
    _badLogged = None
    _badUnlogged = 0

    def makeConnection(self, transport):
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        self._mux = getattr(transport, "_mux", None)
        return amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason):
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None
        self._unprocessed = b""
        self._currentBox = None

    # -- bounded boxes

    def stringReceived(self, string):
        if self._refused:
            return
        self._boxBytes += 2 + len(string)
        if self._boxBytes > MAX_BOX_BYTES:
            self._refuseBox(f"a control message larger than the limit of {MAX_BOX_BYTES} bytes")
            return
        amp.AMP.stringReceived(self, string)

    def proto_key(self, string):
        if string:
            self._boxKeys += 1
            if self._boxKeys > MAX_BOX_KEYS:
                self._refuseBox(
                    f"a control message with more than the limit of {MAX_BOX_KEYS} keys")
                return "key"
        else:
            self._boxKeys = 0
            self._boxBytes = 0
        return amp.AMP.proto_key(self, string)

    def lengthLimitExceeded(self, length):
        self._refuseBox(
            f"a control message key of {length} bytes (the limit is {MAX_KEY_LENGTH})")

    def _refuseBox(self, what):
        """The peer sent a box past a limit: nothing more of it is read."""
        self.stopReading()
        if self._mux is not None:
            self._mux.protocolError(f"the peer sent {what}")
        elif self.transport is not None:
            self.transport.abortConnection()

    def stopReading(self):
        """
        Parse nothing more the peer sent, now or later (what is already
        being answered is still answered).
        """
        self._refused = True
        self.paused = True
        self._currentBox = None
        self._unprocessed = b""

    def bufferedBytes(self):
        """Input bytes held: unparsed, and the box being read."""
        return len(self._unprocessed) + self._boxBytes

    def resumeInput(self):
        """The multiplexer's output drained: read the boxes already received."""
        if self.paused and not self._refused and self.transport is not None:
            self.paused = False
            self.dataReceived(b"")

    # -- checked commands and answers

    def ampBoxReceived(self, box):
        self._boxReceived(box)
        if self._mux is None:
            return
        self._turnBoxes += 1
        if self._mux.controlBacklogged:
            # Stop after this box: the rest waits until the peer reads.
            self.paused = True
        elif self._turnBoxes >= MAX_BOXES_PER_TURN:
            self.paused = True
            self._mux.yieldTurn()

    def _boxReceived(self, box):
        if amp.ANSWER in box or amp.ERROR in box:
            tag = box[amp.ANSWER] if amp.ANSWER in box else box[amp.ERROR]
            if tag not in self._outstandingRequests:
                self.badInput(f"an answer to a question never asked ({show(tag)})")
                return
            if amp.ANSWER not in box:
                box.setdefault(amp.ERROR_CODE, b"UNKNOWN")
                box.setdefault(amp.ERROR_DESCRIPTION, b"(the peer gave no description)")
        elif amp.COMMAND not in box:
            self.badInput("a control message that is neither a command nor an answer")
            return
        amp.AMP.ampBoxReceived(self, box)

    def newTurn(self):
        self._turnBoxes = 0

    def dispatchCommand(self, box):
        d = self._dispatchChecked(box)
        if amp.ASK not in box:
            # Nobody to answer: a refusal is noted, not logged as a failure.
            d.addErrback(self._unanswerable, box[amp.COMMAND])
        return d

    def _unanswerable(self, failure, name):
        failure.trap(amp.RemoteAmpError)
        if not getattr(failure.value, "noted", False):
            self.badInput(f"{show(name)} (asking no answer): {failure.value.description}")

    def _dispatchChecked(self, box):
        name = box[amp.COMMAND]
        entry = self._commandDispatch.get(name)
        if entry is not None and entry[0].__module__ == amp.__name__:
            entry = None        # AMP's own StartTLS: not spoken on channel 0
        if entry is None:
            return self._refuse(amp.UNHANDLED_ERROR_CODE, f"unknown command {show(name)}")
        if self.inFlight >= self.maxInFlight:
            return self._refuse(
                BAD_REQUEST_CODE, f"too many requests in flight (limit {self.maxInFlight})")
        command = entry[0]
        try:
            checkArguments(command.arguments, box)
        except BadArgument as e:
            # "StartVM vm: ...": the command, then the field and its problem.
            return self._refuse(BAD_REQUEST_CODE, f"{command.__name__} {e}")
        self.inFlight += 1

        def answered(result):
            self.inFlight -= 1
            return result

        return amp.AMP.dispatchCommand(self, box).addBoth(answered)

    def _refuse(self, code, description, logged=None):
        """A command refused before its responder: noted, and answered with C{code}."""
        self.badInput(logged or description)
        error = amp.RemoteAmpError(code, description)
        error.noted = True
        return fail(error)

    def badInput(self, problem):
        """
        Note a bad message from the peer: logged once, then at most once
        every BAD_INPUT_LOG_INTERVAL seconds for this connection.
        """
        self.badInputs += 1
        now = self._mux.reactor.seconds() if self._mux is not None else 0.0
        if self._badLogged is not None and now - self._badLogged < BAD_INPUT_LOG_INTERVAL:
            self._badUnlogged += 1
            return
        self._badLogged = now
        unlogged, self._badUnlogged = self._badUnlogged, 0
        self.log.warn(
            "{peer} sent a bad control message: {problem}{more}",
            peer=self._mux.describePeer() if self._mux is not None else "?",
            problem=problem,
            more=f" ({unlogged} more since the last report)" if unlogged else "",
        )
