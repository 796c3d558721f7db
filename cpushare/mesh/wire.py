"""
The datagram between two sellers' clients for one buyer network and one pair.

    0       1       2       4               8                              16
    +-------+-------+-------+---------------+-------------------------------+
    |version| type  | zero  |   session     |            counter            |
    +-------+-------+-------+---------------+-------------------------------+
    |  ChaCha20-Poly1305 of the payload (the header as associated data)     |
    |  ... followed by its 16-byte tag                                      |
    +-----------------------------------------------------------------------+

All integers big-endian.  C{session} is the 32-bit id the receiver chose for
the pair (the market tells it to the sender), so the receiver finds the key
without trying any; C{counter} counts the sender's datagrams of the pair and,
with the direction, makes the nonce.  Each direction has its own key, derived
with HKDF-SHA256 from the 32-byte pair secret the market hands out per buyer
network and pair and from both sellers' ids, sender first: a key never
encrypts in both directions, so a datagram reflected to its sender does not
authenticate.

Payloads by type: DATA one ethernet frame (1 to L{MAX_FRAME} bytes),
KEEPALIVE nothing, PROBE and PROBE_REPLY an 8-byte probe number (a reply is
exactly as long as the probe it answers).

L{Sessions.open} takes any bytes: what is malformed, too big, of an unknown
session, does not authenticate or repeats a counter is dropped and counted by
reason in L{Sessions.drops}; no exception escapes and nothing is answered.
"""

import collections
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cpushare.mesh.replay import LIMIT, ReplayWindow

VERSION = 1

DATA = 1
KEEPALIVE = 2
PROBE = 3
PROBE_REPLY = 4
TYPES = {DATA: "data", KEEPALIVE: "keepalive", PROBE: "probe", PROBE_REPLY: "probe-reply"}

HEADER = struct.Struct("!BBxxIQ")
TAG = 16
OVERHEAD = HEADER.size + TAG
#: The largest ethernet frame carried: 1500 bytes of payload, 64 of headers.
MAX_FRAME = 1500 + 64
#: The largest datagram accepted.
MAX_DATAGRAM = MAX_FRAME + OVERHEAD
PROBE_SIZE = 8
SECRET_SIZE = 32

# Why a datagram was dropped (the keys of Sessions.drops).
SHORT = "short"
TOO_BIG = "too big"
BAD_VERSION = "unknown version"
BAD_TYPE = "unknown type"
MALFORMED = "malformed"
UNKNOWN_SESSION = "unknown session"
UNAUTHENTIC = "not authentic"


def _payloadFits(kind, size):
    if kind == DATA:
        return 1 <= size <= MAX_FRAME
    if kind == KEEPALIVE:
        return size == 0
    return size == PROBE_SIZE


def _idBytes(sellerId):
    encoded = str(sellerId).encode("utf-8")
    return struct.pack("!H", len(encoded)) + encoded


def directionKey(secret, sender, receiver):
    """The 32-byte key of the datagrams C{sender} seals for C{receiver}."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"cpushare mesh v1 key" + _idBytes(sender) + _idBytes(receiver),
                ).derive(secret)


class Pair:
    """
    One end of a pair's secure datagrams: this seller (C{local}) and its peer
    (C{remote}) in one buyer network.  C{localSession} is the id this end
    chose (the peer writes it in what it sends here), C{remoteSession} the id
    the peer chose.  Seals what goes to the peer; checks what comes from it.
    """

    def __init__(self, secret, local, remote, localSession, remoteSession):
        if not isinstance(secret, bytes) or len(secret) != SECRET_SIZE:
            raise ValueError(f"a pair secret is {SECRET_SIZE} bytes")
        if str(local) == str(remote):
            raise ValueError(f"a pair joins two sellers, not {local} with itself")
        for name, session in (("local", localSession), ("remote", remoteSession)):
            if not 0 < session < 2 ** 32:
                raise ValueError(f"the {name} session id {session} is not a 32-bit id above 0")
        self.local, self.remote = local, remote
        self.localSession, self.remoteSession = localSession, remoteSession
        self._seal = ChaCha20Poly1305(directionKey(secret, local, remote))
        self._open = ChaCha20Poly1305(directionKey(secret, remote, local))
        # The direction in the nonce too: the lower id's datagrams carry 0.
        first = _idBytes(local) < _idBytes(remote)
        self._sendDirection, self._receiveDirection = (0, 1) if first else (1, 0)
        self.counter = 0
        self.window = ReplayWindow()

    def seal(self, kind, payload=b""):
        """The datagram of C{payload} as a C{kind}; None once the counter is spent."""
        if kind not in TYPES or not _payloadFits(kind, len(payload)):
            raise ValueError(f"a {TYPES.get(kind, kind)} cannot carry {len(payload)} bytes")
        if self.counter >= LIMIT:
            return None
        header = HEADER.pack(VERSION, kind, self.remoteSession, self.counter)
        nonce = struct.pack("!IQ", self._sendDirection, self.counter)
        self.counter += 1
        return header + self._seal.encrypt(nonce, payload, header)

    def unseal(self, header, counter, sealed):
        """The payload of a datagram from the peer, or the reason it is dropped."""
        nonce = struct.pack("!IQ", self._receiveDirection, counter)
        try:
            payload = self._open.decrypt(nonce, sealed, header)
        except InvalidTag:
            return None, UNAUTHENTIC
        refused = self.window.accept(counter)
        if refused is not None:
            return None, refused
        return payload, None


Opened = collections.namedtuple("Opened", "pair kind counter payload")


def newSessionId(taken, random=os.urandom):
    """A random 32-bit session id above 0 that is not in C{taken}."""
    while True:
        session = int.from_bytes(random(4), "big")
        if session and session not in taken:
            return session


class Sessions:
    """
    The pairs one seller's UDP port serves, by the session id it chose for
    each, and the datagrams it dropped, counted by reason.
    """

    def __init__(self):
        self.pairs = {}
        self.drops = collections.Counter()

    def newId(self, random=os.urandom):
        """A session id above 0 that no pair here uses yet."""
        return newSessionId(self.pairs, random)

    def add(self, pair):
        if pair.localSession in self.pairs:
            raise ValueError(f"session id {pair.localSession} is already in use")
        self.pairs[pair.localSession] = pair

    def remove(self, pair):
        if self.pairs.get(pair.localSession) is pair:
            del self.pairs[pair.localSession]

    def _drop(self, reason):
        self.drops[reason] += 1
        return None

    def open(self, datagram):
        """An authenticated, new datagram as L{Opened}; else None, the drop counted."""
        size = len(datagram)
        if size > MAX_DATAGRAM:
            return self._drop(TOO_BIG)
        if size < OVERHEAD:
            return self._drop(SHORT)
        header = bytes(datagram[:HEADER.size])
        version, kind, session, counter = HEADER.unpack(header)
        if version != VERSION:
            return self._drop(BAD_VERSION)
        if kind not in TYPES:
            return self._drop(BAD_TYPE)
        if header[2:4] != b"\0\0" or not _payloadFits(kind, size - OVERHEAD):
            return self._drop(MALFORMED)
        pair = self.pairs.get(session)
        if pair is None:
            return self._drop(UNKNOWN_SESSION)
        payload, refused = pair.unseal(header, counter, bytes(datagram[HEADER.size:]))
        if refused is not None:
            return self._drop(refused)
        return Opened(pair, kind, counter, payload)
