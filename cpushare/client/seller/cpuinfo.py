"""
The seller's CPU as Linux describes it in /proc/cpuinfo: the vendor, the
family and the model its Offer reports, so that the replicas of a buyer's
VM can be placed on different kinds of CPU.  The market cannot check
what a seller says here; its own CPU benchmark is what it measures.

x86 names them "vendor_id", "cpu family" and "model"; ARM "CPU
implementer", "CPU architecture" and "CPU part".  A description without
all three gives none.
"""

from cpushare.protocol.commands import CPU_TEXT

PATH = "/proc/cpuinfo"
# The most of /proc/cpuinfo read: the first processor's lines come first.
MAX_READ = 64 * 1024

_KEYS = (
    ("vendor_id", "cpu family", "model"),
    ("CPU implementer", "CPU architecture", "CPU part"),
)


def offerFields(text):
    """The Offer's cpu_vendor, cpu_family and cpu_model from /proc/cpuinfo's C{text}, or {}."""
    first = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key not in first:
            first[key] = value.strip()
    for keys in _KEYS:
        values = [first.get(k, "") for k in keys]
        if all(values) and all(v.isprintable() for v in values):
            return {name: value[:CPU_TEXT] for name, value
                    in zip(("cpu_vendor", "cpu_family", "cpu_model"), values)}
    return {}


def readOfferFields(path=PATH):
    """L{offerFields} of this computer ({} where there is no /proc/cpuinfo)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return offerFields(f.read(MAX_READ))
    except OSError:
        return {}
