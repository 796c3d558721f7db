"""
Answers that prove the peer really received what it answers.

The market times its heartbeats and bandwidth probes with its own clock,
but a clock only says when an answer arrived.  That the answer could not
have been written before the request arrived is proven by its content:
each request carries a fresh random nonce (and a probe random bytes), and
the answer must carry the nonce back (a heartbeat), a digest of the nonce
and the bytes (a probe towards the seller), or bytes derived from the
nonce (a probe from the seller).  AMP's request tags are a counter anyone
can predict; these values are not.
"""

import hashlib
import os

NONCE_BYTES = 16


def nonce():
    """A fresh random nonce."""
    return os.urandom(NONCE_BYTES)


def probeDigest(nonce, data):
    """What a seller answers a Probe that carried C{data}: it needs every byte of it."""
    return hashlib.sha256(b"cpushare probe\0" + nonce + data).digest()


def probeFill(nonce, size):
    """The C{size} bytes a seller sends back for a Probe asking for them."""
    return hashlib.shake_256(b"cpushare probe fill\0" + nonce).digest(size)
