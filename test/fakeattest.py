"""
A stand-in for the TPM evidence library (cpushare.attest), for tests of
the trusted market on the fake market: the same names and refusals
(L{EvidenceError} with the same kinds), over evidence that L{FakeTPM}
makes.  It proves nothing cryptographically: "signatures" are HMACs keyed
by the attestation key's public bytes.  It stands for the real library's
checks, each refusing what the real one refuses, so the market's handling
of every refusal is tested without a TPM; the real library is tested
against swtpm.

Use it as C{Attestations(..., library=fakeattest)}.
"""

import hashlib
import hmac
import json
import os
import sys

import attr

PCRS = tuple(range(8)) + (23,)
CLIENT_PCR = 23
MAX_EVENTS = 1024
MAGIC = b"TPM_GENERATED:QUOTE:"
CERTIFY = b"TPM_GENERATED:CERTIFY:"


class EvidenceError(Exception):
    """A refusal: str(e) the reason, e.kind a short word."""

    def __init__(self, kind, reason):
        Exception.__init__(self, reason)
        self.kind = kind


def _sign(akPublic, data):
    return hmac.new(akPublic, data, hashlib.sha256).digest()


def akNameOf(akPublic):
    return b"\x00\x0b" + hashlib.sha256(akPublic).digest()


def extend(value, event):
    line = f"{event['kind']}:{event['digest']}:{event['what']}".encode()
    return hashlib.sha256(value + hashlib.sha256(line).digest()).digest()


def replay(events):
    values = {}
    for event in events:
        pcr = event["pcr"]
        values[pcr] = extend(values.get(pcr, bytes(32)), event)
    return values


def pcrDigest(pcrs):
    return hashlib.sha256(b"".join(pcrs[i] for i in PCRS)).digest()


# What a quote that passed gives the market: the real library's own
# records, so the stand-in cannot drift from them.
from cpushare.attest.evidence import Attested, Clock  # noqa: E402


POLICY_KINDS = ("firmware", "kernel", "qemu", "client")


@attr.s(frozen=True)
class Policy:
    """The operator's allowed digests by kind, as cpushare.attest.evidence.Policy."""
    firmware = attr.ib(default=frozenset(), converter=frozenset)
    kernel = attr.ib(default=frozenset(), converter=frozenset)
    qemu = attr.ib(default=frozenset(), converter=frozenset)
    client = attr.ib(default=frozenset(), converter=frozenset)
    allow_any_firmware = attr.ib(default=False, converter=bool)

    @classmethod
    def fromJSON(cls, text):
        """The policy of JSON C{text}, as the real one reads it (not a dict)."""
        if not isinstance(text, (str, bytes)):
            raise EvidenceError("format", "the policy is not JSON text")
        try:
            document = json.loads(text)
        except ValueError as e:
            raise EvidenceError("format", f"the policy is not JSON ({e})") from None
        known = set(POLICY_KINDS) | {"allow_any_firmware"}
        if not isinstance(document, dict) or not set(document) <= known:
            raise EvidenceError("format", "the policy is not an object of its kinds")
        return cls(**document)

    def toJSON(self):
        document = {kind: sorted(getattr(self, kind)) for kind in POLICY_KINDS}
        document["allow_any_firmware"] = self.allow_any_firmware
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    def check(self, events, unexplained=()):
        if unexplained and not self.allow_any_firmware:
            raise EvidenceError("policy", f"PCR {unexplained[0]} has no boot event log, and the"
                                " operator's policy does not allow any firmware")
        for event in events:
            kind = event["kind"]
            if kind not in POLICY_KINDS:
                continue
            if kind in ("firmware", "kernel") and self.allow_any_firmware:
                continue
            if event["digest"] not in getattr(self, kind):
                raise EvidenceError("policy", f"{'QEMU' if kind == 'qemu' else kind}'s digest"
                                    f" {event['digest'][:16]}... is not allowed by the"
                                    " operator's policy")
        for kind, thing in (("client", "client"), ("qemu", "QEMU binary")):
            if not any(e["kind"] == kind for e in events):
                raise EvidenceError("policy", f"the event log measures no {thing}: a trusted VM"
                                    " runs only under a client and a QEMU the operator allows")


# -- the market's side (cpushare.attest.evidence)

def verifyEnrolment(ekCertDer, ekPublic, akPublic, trustedCAs):
    if not ekCertDer.startswith(b"cert:"):
        raise EvidenceError("format", "the endorsement certificate is not a certificate")
    _, ca, key = ekCertDer.split(b":", 2)
    if ca not in trustedCAs:
        raise EvidenceError("endorsement", "the endorsement certificate is not signed by a CA"
                            " the operator trusts")
    if key != ekPublic:
        raise EvidenceError("endorsement", "the endorsement certificate is for another key")
    if not akPublic.startswith(b"ak:"):
        raise EvidenceError("key", "the attestation key is not a restricted signing key")
    return akNameOf(akPublic)


def makeChallenge(ekPublic, akName):
    secret = os.urandom(32)
    pad = hashlib.sha256(ekPublic).digest()
    return ({"credential_blob": akName,
             "encrypted_secret": bytes(a ^ b for a, b in zip(secret, pad))}, secret)


def checkActivation(secret, answered):
    if not hmac.compare_digest(secret, answered):
        raise EvidenceError("key", "the activated credential is not the one the market made:"
                            " the attestation key is not in the endorsement key's TPM")


def verifyQuote(akPublic, quote, nonce, policy, previous=None):
    attest, signature = quote.get("attest"), quote.get("signature")
    pcrs, events = quote.get("pcrs"), quote.get("events")
    if not isinstance(attest, bytes) or not isinstance(events, list) or \
            len(events) > MAX_EVENTS:
        raise EvidenceError("format", "the quote is malformed")
    if not hmac.compare_digest(_sign(akPublic, attest), signature):
        raise EvidenceError("signature", "the quote is not signed by the enrolled attestation"
                            " key")
    if not attest.startswith(MAGIC):
        raise EvidenceError("format", "the quote is not a TPM-generated quote")
    body, clock = attest[len(MAGIC):-12], attest[-12:]
    if body[:len(nonce)] != nonce or len(body) != len(nonce) + 32:
        raise EvidenceError("nonce", "the quote's nonce is not the one asked for (a replayed"
                            " quote)")
    if set(pcrs) != set(PCRS):
        raise EvidenceError("format", "the quote does not cover the PCRs asked")
    if body[len(nonce):] != pcrDigest(pcrs):
        raise EvidenceError("signature", "the reported PCR values are not the quoted ones")
    clock = Clock(clock=int.from_bytes(clock[:8], "big"),
                  resetCount=int.from_bytes(clock[8:], "big"), restartCount=0, safe=True)
    if previous is not None and clock.wentBackFrom(previous):
        raise EvidenceError("nonce", "the TPM's clock is before its last quote's (a replayed"
                            " quote)")
    replayed = replay(events)
    for pcr, value in replayed.items():
        if pcrs.get(pcr) != value:
            raise EvidenceError("eventlog", f"the event log does not replay to the quoted"
                                f" PCR {pcr}")
    if CLIENT_PCR not in replayed and pcrs[CLIENT_PCR] != bytes(32):
        raise EvidenceError("eventlog", f"the event log does not replay to the quoted PCR"
                            f" {CLIENT_PCR}")
    policy.check(events, unexplained=[i for i in range(8) if i not in replayed
                                      and pcrs[i] != bytes(32)])
    return Attested(
        pcrs=pcrs, events=events, clock=clock,
        client=tuple(e["digest"] for e in events if e["kind"] == "client"),
        qemu=tuple(e["digest"] for e in events if e["kind"] == "qemu"),
        images=tuple(e["digest"] for e in events if e["kind"] == "image"))


def verifyBindingKey(akPublic, binding, nonce, pcrs):
    certify = binding["certify"]
    if not hmac.compare_digest(_sign(akPublic, certify), binding["signature"]):
        raise EvidenceError("signature", "the binding key is not certified by the attestation"
                            " key")
    if certify != CERTIFY + nonce + hashlib.sha256(binding["public"]).digest():
        raise EvidenceError("nonce", "the binding key's certification is not over the nonce"
                            " asked")
    if not binding["public"].endswith(pcrDigest(pcrs)):
        raise EvidenceError("key", "the binding key's policy is not the quoted PCR values")
    return binding["public"]


def wrapSecret(keyPublic, secret):
    pad = hashlib.sha256(keyPublic).digest()
    return bytes(a ^ b for a, b in zip(secret, pad * (len(secret) // 32 + 1)))


evidence = sys.modules[__name__]


# -- the seller's side, for tests

class FakeTPM:
    """Evidence the double accepts: an endorsement key certified by C{ca}, an AK, PCRs."""

    def __init__(self, ca=b"test-ca"):
        self.ekPublic = b"ek-" + os.urandom(16).hex().encode()
        self.ekCert = b"cert:" + ca + b":" + self.ekPublic
        self.akPublic = b"ak:" + os.urandom(16).hex().encode()
        self.boot = [{"pcr": 0, "kind": "firmware", "digest": "f" * 64, "what": "bios"},
                     {"pcr": 4, "kind": "kernel", "digest": "e" * 64, "what": "vmlinuz"}]
        self.events = []
        self.keys = {}
        self.clock = 1000
        self.resetCount = 1

    def activate(self, challenge):
        if challenge["credential_blob"] != akNameOf(self.akPublic):
            raise EvidenceError("key", "the credential is for another key")
        pad = hashlib.sha256(self.ekPublic).digest()
        return bytes(a ^ b for a, b in zip(challenge["encrypted_secret"], pad))

    def measure(self, kind, digest, what):
        event = {"pcr": CLIENT_PCR, "kind": kind, "digest": digest, "what": what}
        self.events.append(event)
        return event

    def pcrs(self):
        values = {i: bytes(32) for i in PCRS}
        values.update(replay(self.boot + self.events))
        return values

    def quote(self, nonce):
        pcrs = self.pcrs()
        self.clock += 1
        attest = MAGIC + nonce + pcrDigest(pcrs) + self.clock.to_bytes(8, "big") + \
            self.resetCount.to_bytes(4, "big")
        return {"attest": attest, "signature": _sign(self.akPublic, attest), "pcrs": pcrs,
                "events": list(self.boot + self.events)}

    def bindingKey(self, nonce, pcrs):
        public = b"key:" + os.urandom(8).hex().encode() + pcrDigest(pcrs)
        certify = CERTIFY + nonce + hashlib.sha256(public).digest()
        self.keys[public] = pcrs
        return {"public": public, "certify": certify,
                "signature": _sign(self.akPublic, certify)}

    def unwrap(self, binding, wrapped):
        """As the real TPM.unwrap: C{binding} is the dict bindingKey returned."""
        public = binding.get("public") if isinstance(binding, dict) else None
        if public not in self.keys:
            raise EvidenceError("key", "this TPM made no such binding key (or has forgotten it)")
        if self.keys.get(public) != self.pcrs():
            raise EvidenceError("key", "the PCR values changed: the key cannot be used")
        return wrapSecret(public, wrapped)
