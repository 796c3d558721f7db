"""
The events measured into the PCRs, and replaying them.

An event is a JSON-able dict:

    {"pcr": 23, "kind": "qemu", "digest": "<64 hex: sha256>", "what": "/usr/bin/qemu-system-x86_64"}

The seller's client measures three kinds into L{CLIENT_PCR}: C{client} (its
own code), C{qemu} (the QEMU binary) and C{image} (the buyer's image; C{what}
names the lease).  It extends the PCR with

    sha256(kind ":" digest ":" what)        (UTF-8; kind and digest hold no ":")

so the log says what was measured and the PCR commits to all three fields.

The boot chain (PCRs 0-7) comes from the host's TCG crypto-agile event log
(/sys/kernel/security/tpm0/binary_bios_measurements), read by L{parseTCG}:
each event there carries the sha256 the firmware extended, kept as C{digest}
(and extended as is), its TCG event type's name as C{what}, and a C{kind}
inferred from the type, simply: EV_IPL and EV_EFI_BOOT_SERVICES_APPLICATION
(the boot loader and kernel images the firmware starts) are C{kernel},
EV_SEPARATOR is C{separator} (it measures no code), every other type is
C{firmware}.  EV_NO_ACTION events extend nothing and are left out; so are
the PCRs past 7.  A log whose StartupLocality is not 0 (an H-CRTM or TXT
start) does not replay from zeros and is not supported.
"""

import hashlib
import re
import struct

from . import BOOT_PCRS, CLIENT_PCR, MAX_EVENTS, PCRS, EvidenceError

CLIENT_KINDS = ("client", "qemu", "image")
BOOT_KINDS = ("firmware", "kernel", "separator")
MAX_WHAT = 256
"""Characters in an event's C{what}."""
MAX_CLIENT_EVENTS = 128
"""Events the client keeps in its log until PCR 23 is reset (a few a VM)."""
MAX_BOOT_EVENTS = MAX_EVENTS - MAX_CLIENT_EVENTS
"""Boot-chain events kept from a TCG event log, so a quote's log fits L{MAX_EVENTS}."""
MAX_TCG_LOG = 1024 * 1024
"""Bytes of a host's TCG event log (real ones are tens of kilobytes)."""

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_KEYS = {"pcr", "kind", "digest", "what"}

EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_IPL = 0xD
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
_KERNEL_TYPES = {EV_IPL, EV_EFI_BOOT_SERVICES_APPLICATION}

EVENT_TYPES = {
    0x0: "EV_PREBOOT_CERT", 0x1: "EV_POST_CODE", 0x2: "EV_UNUSED", 0x3: "EV_NO_ACTION",
    0x4: "EV_SEPARATOR", 0x5: "EV_ACTION", 0x6: "EV_EVENT_TAG", 0x7: "EV_S_CRTM_CONTENTS",
    0x8: "EV_S_CRTM_VERSION", 0x9: "EV_CPU_MICROCODE", 0xA: "EV_PLATFORM_CONFIG_FLAGS",
    0xB: "EV_TABLE_OF_DEVICES", 0xC: "EV_COMPACT_HASH", 0xD: "EV_IPL",
    0xE: "EV_IPL_PARTITION_DATA", 0xF: "EV_NONHOST_CODE", 0x10: "EV_NONHOST_CONFIG",
    0x11: "EV_NONHOST_INFO", 0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG", 0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION", 0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER", 0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION", 0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES", 0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2", 0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT", 0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB", 0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}

TPM_ALG_SHA256 = 0x000B
SPEC_ID = b"Spec ID Event03\x00"
MAX_ALGORITHMS = 16


def checkEvent(event, index=None):
    """
    C{event} as a clean event dict, or EvidenceError("format") naming what is
    wrong with it: exactly the four keys, a PCR of L{PCRS}, a kind that PCR
    takes, a sha256 in lowercase hex, a short printable C{what}.
    """
    where = "an event" if index is None else f"event {index}"
    if not isinstance(event, dict) or set(event) != _KEYS:
        raise EvidenceError("format", f"{where} is not a dict of pcr, kind, digest and what")
    pcr, kind, digest, what = event["pcr"], event["kind"], event["digest"], event["what"]
    if type(pcr) is not int or pcr not in PCRS:
        raise EvidenceError("format", f"{where} names PCR {pcr!r}, not one of {list(PCRS)}")
    kinds = CLIENT_KINDS if pcr == CLIENT_PCR else BOOT_KINDS
    if not isinstance(kind, str) or kind not in kinds:
        raise EvidenceError("format", f"{where} has the kind {kind!r}: PCR {pcr} takes {', '.join(kinds)}")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise EvidenceError("format", f"{where}'s digest is not a sha256 in lowercase hex")
    if not isinstance(what, str) or len(what) > MAX_WHAT or not what.isprintable():
        raise EvidenceError("format", f"{where}'s what is not printable text of at most {MAX_WHAT} characters")
    return {"pcr": pcr, "kind": kind, "digest": digest, "what": what}


def checkEvents(events):
    """C{events} as a list of clean event dicts (L{checkEvent}), at most L{MAX_EVENTS}."""
    if not isinstance(events, (list, tuple)):
        raise EvidenceError("format", "the event log is not a list")
    if len(events) > MAX_EVENTS:
        raise EvidenceError("format", f"the event log holds {len(events)} events, more than the {MAX_EVENTS} allowed")
    return [checkEvent(e, i) for i, e in enumerate(events)]


def clientEvent(kind, digest, what):
    """The client's event measuring C{digest} (hex sha256) of C{kind} into L{CLIENT_PCR}."""
    return checkEvent({"pcr": CLIENT_PCR, "kind": kind, "digest": digest, "what": what})


def extendValue(event):
    """The sha256 that C{event} extends its PCR with (see the module's docstring)."""
    if event["pcr"] == CLIENT_PCR:
        text = f"{event['kind']}:{event['digest']}:{event['what']}"
        return hashlib.sha256(text.encode("utf-8")).digest()
    return bytes.fromhex(event["digest"])


def extend(value, digest):
    """A sha256 PCR C{value} after extending it with C{digest}."""
    return hashlib.sha256(value + digest).digest()


def replay(events):
    """{pcr: value} of every PCR C{events} extend, each replayed from zeros in order."""
    values = {}
    for event in checkEvents(events):
        pcr = event["pcr"]
        values[pcr] = extend(values.get(pcr, bytes(32)), extendValue(event))
    return values


class _Reader:
    """Little-endian fields read off a bounded buffer; past its end is EvidenceError("format")."""

    def __init__(self, data):
        self.data = data
        self.offset = 0

    def take(self, n, what):
        if n < 0 or self.offset + n > len(self.data):
            raise EvidenceError("format", f"the TCG event log ends inside {what} (at byte {self.offset})")
        chunk = self.data[self.offset:self.offset + n]
        self.offset += n
        return chunk

    def unpack(self, fmt, what):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def done(self):
        return self.offset >= len(self.data)


def _specID(reader):
    """The digest sizes by algorithm of the log's first event, the Spec ID Event03 header."""
    pcr, kind, _sha1, size = reader.unpack("<II20sI", "the header event")
    if kind != EV_NO_ACTION or pcr != 0:
        raise EvidenceError("format", "the TCG event log does not start with a Spec ID event")
    header = _Reader(reader.take(size, "the header event"))
    if header.take(16, "the Spec ID event") != SPEC_ID:
        raise EvidenceError("format", "the TCG event log is not crypto-agile (no Spec ID Event03)")
    header.unpack("<IBBBB", "the Spec ID event")
    (count,) = header.unpack("<I", "the Spec ID event")
    if not 0 < count <= MAX_ALGORITHMS:
        raise EvidenceError("format", f"the TCG event log's header lists {count} digest algorithms")
    sizes = {}
    for _ in range(count):
        alg, digestSize = header.unpack("<HH", "the Spec ID event's algorithms")
        if not 0 < digestSize <= 64:
            raise EvidenceError("format", f"the TCG event log's header gives a digest of {digestSize} bytes")
        sizes[alg] = digestSize
    if sizes.get(TPM_ALG_SHA256) != 32:
        raise EvidenceError("format", "the TCG event log has no sha256 bank")
    return sizes


def bootKind(eventType):
    """The kind of a boot-chain event of TCG type C{eventType} (see the module's docstring)."""
    if eventType in _KERNEL_TYPES:
        return "kernel"
    if eventType == EV_SEPARATOR:
        return "separator"
    return "firmware"


def parseTCG(data):
    """
    The boot-chain events (PCRs 0-7, sha256 bank) of a TCG crypto-agile event
    log C{data} (bytes, at most L{MAX_TCG_LOG}), in order; EvidenceError("format")
    for anything malformed or too big.
    """
    if not isinstance(data, bytes):
        raise EvidenceError("format", "the TCG event log is not bytes")
    if len(data) > MAX_TCG_LOG:
        raise EvidenceError("format", f"the TCG event log is {len(data)} bytes, more than the {MAX_TCG_LOG} allowed")
    reader = _Reader(data)
    sizes = _specID(reader)
    events = []
    while not reader.done():
        pcr, eventType, count = reader.unpack("<III", "an event")
        if count > len(sizes):
            raise EvidenceError("format", f"a TCG event carries {count} digests, more than the header's {len(sizes)}")
        sha256 = None
        for _ in range(count):
            (alg,) = reader.unpack("<H", "an event's digests")
            if alg not in sizes:
                raise EvidenceError("format", f"a TCG event carries a digest of algorithm {alg:#06x} the header does not list")
            digest = reader.take(sizes[alg], "an event's digest")
            if alg == TPM_ALG_SHA256:
                sha256 = digest
        (size,) = reader.unpack("<I", "an event")
        reader.take(size, "an event's data")
        if eventType == EV_NO_ACTION or pcr not in BOOT_PCRS:
            continue
        if sha256 is None:
            raise EvidenceError("format", f"a TCG event of PCR {pcr} has no sha256 digest")
        if len(events) == MAX_BOOT_EVENTS:
            raise EvidenceError("format", f"the TCG event log holds more than {MAX_BOOT_EVENTS} boot-chain events")
        events.append({"pcr": pcr, "kind": bootKind(eventType), "digest": sha256.hex(),
                       "what": EVENT_TYPES.get(eventType, f"{eventType:#010x}")})
    return events
