"""
Trusted computing: everything that talks to a TPM or checks what one says.

Three modules, one concern each:

    eventlog   the events measured into the PCRs: the client's own (its
               code, QEMU, the buyer's image) and the host's boot chain read
               from the TCG event log; replaying them to PCR values
    evidence   the market's side: pure functions over the bytes a seller
               sends (enrolment, credential activation, quotes, binding keys)
               and the operator's L{evidence.Policy}; no TPM needed
    tpm        the seller's side: the calls into its TPM (tpm2-pytss), and
               L{tpm.TPMService}, the same calls as Deferreds on a thread

Everything crossing the wire is bytes (TPM2B-marshalled TPM structures, DER
for certificates) or a JSON-able event dict, bounded by L{MAX_EVIDENCE} and
L{MAX_EVENTS}; anything refused raises L{EvidenceError}, whose text is the
reason a user reads and whose C{kind} a program can test.
"""

CLIENT_PCR = 23
"""The PCR the seller's client extends (sha256 bank; resettable at locality 0)."""

BOOT_PCRS = tuple(range(8))
"""The boot chain: firmware, its configuration, the boot loader and kernel."""

PCRS = BOOT_PCRS + (CLIENT_PCR,)
"""The PCRs every quote covers, in the sha256 bank, in this order."""

MAX_EVIDENCE = 16 * 1024
"""Bytes in one piece of evidence (a certificate, a public area, a quote)."""

MAX_EVENTS = 512
"""Events in one event log (the boot chain's and the client's together)."""

KINDS = ("nonce", "signature", "endorsement", "eventlog", "policy", "key", "format", "tpm")


class EvidenceError(Exception):
    """
    Evidence refused, or a TPM that cannot give it.  C{str(e)} is the reason a
    user reads; C{e.kind} is one of L{KINDS}: C{nonce} (a replayed or foreign
    quote), C{signature}, C{endorsement} (the EK or its certificate),
    C{eventlog} (does not replay), C{policy} (the operator's policy refuses a
    digest), C{key} (the attestation or binding key, or activation),
    C{format} (malformed or oversized), C{tpm} (the seller's own TPM fails).
    """

    def __init__(self, kind, reason):
        if kind not in KINDS:
            raise ValueError(f"unknown kind of evidence error: {kind!r}")
        super().__init__(reason)
        self.kind = kind
        self.reason = reason

    def __repr__(self):
        return f"EvidenceError({self.kind!r}, {self.reason!r})"


def bounded(name, data, limit=MAX_EVIDENCE):
    """C{data} if it is bytes of at most C{limit}; else EvidenceError("format") naming C{name}."""
    if not isinstance(data, bytes):
        raise EvidenceError("format", f"the {name} is not bytes")
    if len(data) > limit:
        raise EvidenceError("format", f"the {name} is {len(data)} bytes, more than the {limit} allowed")
    return data


def libraryMissing():
    """
    None when the TPM library (tpm2-pytss, on Debian's libtss2) can be
    imported, else what to install: it is an extra of the package, needed
    only by sellers with --tpm and markets that take enrolments.
    """
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError as e:
        return (f"the TPM library tpm2-pytss is not installed ({e}): pip install"
                " 'cpushare[tpm]' (it builds against Debian's libtss2-dev: apt-get install"
                " libtss2-dev pkg-config build-essential; `make setup` installs both)")
    return None
