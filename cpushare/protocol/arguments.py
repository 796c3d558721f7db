"""
The check every control command's arguments pass before any responder
sees them, on both sides of a connection.

AMP itself turns b"abc" for an Integer into a ValueError, and takes any
size of integer, NaN or a NUL inside text; a responder would then fail
deep inside (SQL, struct) with a traceback, and AMP would drop the
connection.  Here each argument is checked against its declared type
first, and the first problem found is named, field first, in words a
user can act on::

    price: 9223372036854775808 is out of range (-2^63 to 2^63-1)

The limits (MIN_INTEGER, MAX_INTEGER) are those of a signed 64-bit
integer: what SQL (BIGINT, SQLite's INTEGER) can store.
"""

import math
import re

from twisted.protocols import amp

MIN_INTEGER = -(2**63)
MAX_INTEGER = 2**63 - 1
# At most 19 digits: beyond, a value is out of range anyway, and Python
# would spend time (or refuse) converting thousands of digits.
_INTEGER = re.compile(rb"-?[0-9]{1,19}\Z")
_FLOAT = re.compile(rb"-?[0-9]{1,40}(\.[0-9]{0,40})?([eE][-+]?[0-9]{1,3})?\Z")
_SHOWN = 40


class BadArgument(ValueError):
    """An argument that does not fit its declared type; the message names it."""


def show(value):
    """A value as a log or error message shows it: short, printable."""
    if isinstance(value, bytes):
        text = value[:_SHOWN].decode("ascii", "backslashreplace")
    else:
        text = str(value)[:_SHOWN]
    text = text.encode("unicode_escape").decode("ascii")
    return text + ("..." if len(value) > _SHOWN else "")


def checkInteger(name, raw):
    if not _INTEGER.match(raw):
        if re.match(rb"-?[0-9]+\Z", raw):
            raise BadArgument(f"{name}: {show(raw)} is out of range (-2^63 to 2^63-1)")
        raise BadArgument(f"{name}: {show(raw)!r} is not an integer")
    value = int(raw)
    if not MIN_INTEGER <= value <= MAX_INTEGER:
        raise BadArgument(f"{name}: {value} is out of range (-2^63 to 2^63-1)")
    return value


def checkFloat(name, raw):
    if not _FLOAT.match(raw):
        raise BadArgument(f"{name}: {show(raw)!r} is not a finite number")
    value = float(raw)
    if not math.isfinite(value):
        raise BadArgument(f"{name}: {show(raw)} is out of range")
    return value


def checkText(name, raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadArgument(f"{name}: not UTF-8 text") from None
    if "\0" in text:
        raise BadArgument(f"{name}: text must not contain NUL characters")
    return text


class Text(amp.Unicode):
    """Unicode text of at most C{maxLength} characters."""

    def __init__(self, maxLength, optional=False):
        amp.Unicode.__init__(self, optional)
        self.maxLength = maxLength


class Blob(amp.String):
    """Bytes of at most C{maxLength} (TPM evidence: structures, certificates, JSON)."""

    def __init__(self, maxLength, optional=False):
        amp.String.__init__(self, optional)
        self.maxLength = maxLength


class Sha256(amp.Unicode):
    """A sha256 digest as 64 lowercase hexadecimal characters."""


_SHA256 = re.compile(rb"[0-9a-f]{64}\Z")


def checkSha256(name, raw):
    if not _SHA256.match(raw):
        raise BadArgument(f"{name}: {show(raw)!r} is not a sha256 (64 lowercase hex characters)")
    return raw.decode("ascii")


def checkBoolean(name, raw):
    if raw not in (b"True", b"False"):
        raise BadArgument(f"{name}: {show(raw)!r} is not True or False")
    return raw == b"True"


def checkValue(name, argument, raw):
    """Check one serialized value against its L{amp.Argument}; raise L{BadArgument}."""
    if isinstance(argument, amp.Integer):
        return checkInteger(name, raw)
    if isinstance(argument, amp.Float):
        return checkFloat(name, raw)
    if isinstance(argument, amp.Boolean):
        return checkBoolean(name, raw)
    if isinstance(argument, Sha256):
        return checkSha256(name, raw)
    if isinstance(argument, Text):
        text = checkText(name, raw)
        if len(text) > argument.maxLength:
            raise BadArgument(f"{name}: longer than {argument.maxLength} characters")
        return text
    if isinstance(argument, amp.Unicode):
        return checkText(name, raw)
    if isinstance(argument, Blob):
        if len(raw) > argument.maxLength:
            raise BadArgument(f"{name}: longer than {argument.maxLength} bytes")
        return raw
    if isinstance(argument, amp.ListOf):
        items = _strings(name, raw)
        for i, item in enumerate(items):
            checkValue(f"{name}[{i}]", argument.elementType, item)
        return items
    if isinstance(argument, amp.AmpList):
        try:
            boxes = amp.parseString(raw)
        except Exception:
            raise BadArgument(f"{name}: not a list of boxes") from None
        for i, box in enumerate(boxes):
            checkArguments(argument.subargs, box, f"{name}[{i}].")
        return boxes
    return raw


def _strings(name, raw):
    """The length-prefixed strings of a ListOf value."""
    items = []
    offset = 0
    while offset < len(raw):
        if offset + 2 > len(raw):
            raise BadArgument(f"{name}: not a well-formed list")
        length = int.from_bytes(raw[offset:offset + 2], "big")
        offset += 2
        if offset + length > len(raw):
            raise BadArgument(f"{name}: not a well-formed list")
        items.append(raw[offset:offset + length])
        offset += length
    return items


def checkArguments(arguments, box, prefix=""):
    """
    Check the values in C{box} (a mapping of bytes to bytes) against a
    command's C{arguments}; raise L{BadArgument} naming the first problem.
    """
    for key, argument in arguments:
        name = prefix + key.decode("ascii", "replace")
        raw = box.get(key)
        if raw is None:
            if not argument.optional:
                raise BadArgument(f"{name}: missing")
            continue
        checkValue(name, argument, raw)
