"""
What a seller checks of every command the market sends it.

The seller runs what the market asks, so a hostile or compromised market
must be able to make it run nothing but the sandboxed QEMU it always runs.
Every field of every command from the market is checked here before it is
used: nothing free-form reaches QEMU's command line, a file path or the
seller's memory.  A refused command gets a BadRequest naming the command
and the field ("StartVM mac: ..."), and one line in the seller's log (at
most REFUSALS_LOGGED a minute; the rest are counted).

The checks, and why:

- a VM id is 1 to MAX_VM_ID: its NIC and console channels (2*vm, 2*vm+1)
  must fit the mux's 32-bit channel numbers and never be channel 0, the
  control channel;
- an image is named by its sha256, exactly 64 lowercase hex digits: the
  cache's file name is built from it;
- an image's size is 1 byte to the cache's cap (--cache-size);
- a MAC is six lowercase hex pairs joined by colons, unicast and locally
  administered (the market assigns 0a:cb:...): it goes into a QEMU option,
  where a comma would add options;
- cores and memory are at least 1 core and MIN_VM_MEMORY MB, and together
  with the VMs already running, within what this seller offers;
- the heartbeat the market asks for in its answer to Hello is every
  MIN_HEARTBEAT to MAX_HEARTBEAT seconds, its silence timeout longer and
  at most MAX_SILENCE (a client pinging without pause, or never noticing
  a dead market, is refused: the connection is dropped and retried);
- a Probe asks for 0 to PROBE_CHUNK bytes back and sends at most
  PROBE_CHUNK;
- a seller never links channels itself, so ChannelLinked is ignored (a
  market cannot grow its table), and a ChannelUnlinked reason is logged
  shortened to printable text (it cannot forge log lines).
"""

import re

from twisted.logger import Logger

from cpushare.protocol.commands import PROBE_CHUNK, BadRequest
from cpushare.protocol.mux import MAX_CHANNEL

MAX_VM_ID = (MAX_CHANNEL - 1) // 2
MIN_VM_MEMORY = 64
MIN_HEARTBEAT = 0.05
MAX_HEARTBEAT = 3600.0
MAX_SILENCE = 86400.0
REFUSALS_LOGGED = 10
REFUSAL_WINDOW = 60.0
SHOWN = 80

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")


def printable(value, limit=SHOWN):
    """C{value} as a short one-line text that is safe to log or show."""
    if isinstance(value, str):
        text = "".join(c if c.isprintable() and c.isascii() else "?" for c in value[:limit])
        return text + ("..." if len(value) > limit else "")
    text = repr(value)
    return text[:limit] + ("..." if len(text) > limit else "")


def _shown(value):
    return repr(value[:SHOWN]) + ("..." if len(value) > SHOWN else "") \
        if isinstance(value, (str, bytes)) else printable(value)


def refuse(command, field, value, why):
    raise BadRequest(f"{command} {field}: {_shown(value)} {why}")


def _isInt(value):
    return isinstance(value, int) and not isinstance(value, bool)


def checkVMId(command, vm):
    if not _isInt(vm) or not 1 <= vm <= MAX_VM_ID:
        refuse(command, "vm", vm, f"is not a VM id (1 to {MAX_VM_ID})")


def checkImage(command, image):
    if not isinstance(image, str) or not _SHA256.fullmatch(image):
        refuse(command, "image", image, "is not a sha256 (64 lowercase hex digits)")


def checkMAC(command, mac):
    if not isinstance(mac, str) or not _MAC.fullmatch(mac):
        refuse(command, "mac", mac, "is not a MAC address like 0a:cb:00:00:00:01")
    first = int(mac[:2], 16)
    if first & 1:
        refuse(command, "mac", mac, "is a multicast address, not a VM's")
    if not first & 2:
        refuse(command, "mac", mac,
               "is not locally administered (the market assigns 0a:cb:...)")


def checkStartVM(vm, image, size, cores, memory, mac, cacheBytes,
                 freeCores, freeMemory):
    """
    Check a StartVM against this seller: C{cacheBytes} is the image cache's
    cap, C{freeCores} and C{freeMemory} (MB) what the VMs already running
    leave of the offer.
    """
    command = "StartVM"
    checkVMId(command, vm)
    checkImage(command, image)
    if not _isInt(size) or not 1 <= size <= cacheBytes:
        refuse(command, "size", size,
               f"bytes is not an image size this seller caches (1 to {cacheBytes})")
    if not _isInt(cores) or not 1 <= cores <= freeCores:
        refuse(command, "cores", cores,
               f"is not 1 to the {freeCores} cores this seller has free")
    if not _isInt(memory) or not MIN_VM_MEMORY <= memory <= freeMemory:
        refuse(command, "memory", memory,
               f"MB is not {MIN_VM_MEMORY} to the {freeMemory} MB this seller has free")
    checkMAC(command, mac)


def checkHeartbeat(heartbeat, timeout):
    """
    The heartbeat settings of the market's answer to Hello: a ping every
    C{heartbeat} seconds (MIN_HEARTBEAT to MAX_HEARTBEAT), silence for
    C{timeout} seconds (longer, at most MAX_SILENCE) ends the connection.
    """
    if not MIN_HEARTBEAT <= heartbeat <= MAX_HEARTBEAT:
        refuse("Hello", "heartbeat", heartbeat,
               f"seconds is not {MIN_HEARTBEAT} to {MAX_HEARTBEAT:.0f}")
    if not heartbeat < timeout <= MAX_SILENCE:
        refuse("Hello", "timeout", timeout,
               f"seconds is not more than the heartbeat ({heartbeat}) and at most "
               f"{MAX_SILENCE:.0f}")


def checkProbe(data, back):
    if len(data) > PROBE_CHUNK:
        refuse("Probe", "data", len(data), f"bytes is more than {PROBE_CHUNK}")
    if back is not None and (not _isInt(back) or not 0 <= back <= PROBE_CHUNK):
        refuse("Probe", "back", back, f"is not 0 to {PROBE_CHUNK} bytes")


class RefusalLog:
    """
    One log line for each command refused, at most REFUSALS_LOGGED in
    REFUSAL_WINDOW seconds; past that the refusals are counted and the
    count logged when the window ends.  C{clock} has C{seconds} and
    C{callLater}.
    """

    log = Logger()

    def __init__(self, clock, limit=REFUSALS_LOGGED, window=REFUSAL_WINDOW):
        self.clock = clock
        self.limit = limit
        self.window = window
        self.logged = 0
        self.unlogged = 0
        self._windowEnd = None
        self._flushCall = None

    def refused(self, why):
        now = self.clock.seconds()
        if self._windowEnd is None or now >= self._windowEnd:
            self._windowEnd = now + self.window
            self.logged = 0
        if self.logged < self.limit:
            self.logged += 1
            self.log.warn("refused a command of the market: {why}", why=printable(why, 300))
            return
        self.unlogged += 1
        if self._flushCall is None:
            self._flushCall = self.clock.callLater(self._windowEnd - now, self._flush)

    def _flush(self):
        self._flushCall = None
        self.log.warn("refused {n} more commands of the market in {window:.0f}s"
                      " (not logged one by one)", n=self.unlogged, window=self.window)
        self.unlogged = 0

    def stop(self):
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
