"""
The market's side of trusted computing: pure functions over the bytes a
seller sends, and the operator's policy.  No TPM is needed; the work is
CPU-bound (RSA), so the market calls these on a thread pool.

The seller's evidence, in the order the market asks for it:

    enrolment    L{verifyEnrolment}: the endorsement key's (EK) certificate
                 chains to a CA the operator trusts and is the EK's, and the
                 attestation key (AK) is a restricted signing key that never
                 leaves the TPM; then L{makeChallenge} (TPM2_MakeCredential in
                 software) and L{checkActivation} prove both keys live in the
                 same TPM, the only one that can activate the credential
    a quote      L{verifyQuote}: signed by the AK over the market's nonce,
                 over L{PCRS}, with an event log that replays to the quoted
                 values and that the operator's L{Policy} allows
    a binding    L{verifyBindingKey}: a decryption key the AK certifies that
                 the TPM uses only in the quoted PCR state; L{wrapSecret}
                 encrypts a secret (an image's key) to it

Every refusal is an L{EvidenceError} whose text is the reason.  TPM
structures are parsed by libtss2's unmarshalling (tpm2-pytss), which checks
every length against the buffer; each piece is bounded by L{MAX_EVIDENCE}
first and must be consumed exactly.
"""

import hashlib
import hmac
import json
import os
import struct

import attr
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_ATTEST, TPM2B_NAME, TPM2B_PUBLIC, TPML_PCR_SELECTION, TPMS_ATTEST, TPMT_SIGNATURE,
)
from tpm2_pytss.utils import make_credential

from . import BOOT_PCRS, CLIENT_PCR, MAX_EVIDENCE, PCRS, EvidenceError, bounded
from .eventlog import checkEvents, replay

SECRET_BYTES = 32
"""Bytes of a credential activation's secret."""
MIN_NONCE, MAX_NONCE = 16, 64
"""Bytes of a nonce: at least 128 bits, at most what TPM2B_DATA holds."""
WRAP_LABEL = b"CPUSHARE IMAGE KEY\x00"
"""The OAEP label of a wrapped secret, NUL-ended as the TPM sends a label."""
NAME_BYTES = 2 + 32
"""A TPM name: the sha256 algorithm's number, then the sha256 of the public area."""
MAX_POLICY = 1024 * 1024
"""Bytes of a policy's JSON."""
MAX_POLICY_DIGESTS = 10000
"""Digests of one kind in a policy."""
POLICY_KINDS = ("firmware", "kernel", "qemu", "client")

TPM_CC_POLICY_PCR = 0x0000017F
PCR_SELECTION = TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, PCRS)))
"""The sha256 selection of L{PCRS}, as a quote and a binding key's policy name it."""

_SIGN_KEY = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
             | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN)
_STORAGE_KEY = TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
_BINDING_KEY = (TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                | TPMA_OBJECT.SENSITIVEDATAORIGIN)
_CURVES = {TPM2_ECC.NIST_P256: ec.SECP256R1, TPM2_ECC.NIST_P384: ec.SECP384R1}
_RSA_BITS = (2048, 3072, 4096)


def unmarshal(cls, data, name):
    """C{data} (bounded bytes) unmarshalled as C{cls}, which must use every byte."""
    bounded(name, data)
    try:
        value, used = cls.unmarshal(data)
    except (TSS2_Exception, TypeError, ValueError) as e:
        raise EvidenceError("format", f"the {name} is not a marshalled {cls.__name__} ({e})") from None
    if used != len(data):
        raise EvidenceError("format", f"the {name} has {len(data) - used} bytes after its {cls.__name__}")
    return value


def _public(data, name):
    """The TPMT_PUBLIC of C{data}, a marshalled TPM2B_PUBLIC whose name algorithm is sha256."""
    public = unmarshal(TPM2B_PUBLIC, data, name).publicArea
    if public.nameAlg != TPM2_ALG.SHA256:
        raise EvidenceError("format", f"the {name}'s name algorithm is not sha256")
    return public


def name(public):
    """The TPM name of a TPMT_PUBLIC whose name algorithm is sha256."""
    return struct.pack(">H", TPM2_ALG.SHA256) + hashlib.sha256(public.marshal()).digest()


def publicKey(public, what):
    """The cryptography public key of a TPMT_PUBLIC (RSA 2048-4096, or ECC P-256/P-384)."""
    try:
        if public.type == TPM2_ALG.RSA:
            bits = public.parameters.rsaDetail.keyBits
            modulus = bytes(public.unique.rsa)
            if bits not in _RSA_BITS or len(modulus) * 8 != bits:
                raise EvidenceError("key", f"the {what} is an RSA key of {len(modulus) * 8} bits, not 2048, 3072 or 4096")
            exponent = public.parameters.rsaDetail.exponent or 65537
            return rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
        if public.type == TPM2_ALG.ECC:
            curve = _CURVES.get(public.parameters.eccDetail.curveID)
            if curve is None:
                raise EvidenceError("key", f"the {what} is on an ECC curve other than P-256 and P-384")
            x, y = (int.from_bytes(bytes(c), "big") for c in (public.unique.ecc.x, public.unique.ecc.y))
            return ec.EllipticCurvePublicNumbers(x, y, curve()).public_key()
    except ValueError as e:
        raise EvidenceError("key", f"the {what} is not a valid public key ({e})") from None
    raise EvidenceError("key", f"the {what} is neither an RSA nor an ECC key")


def _sameKey(a, b):
    """Whether two cryptography public keys are the same key."""
    def der(key):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der(a) == der(b)


def _hasAll(attributes, wanted):
    return attributes & wanted == wanted


# -- enrolment ---------------------------------------------------------------

def verifyEnrolment(ekCertDer, ekPublic, akPublic, trustedCAs):
    """
    The AK's name (bytes) when C{ekCertDer} (DER) is issued by one of
    C{trustedCAs} (cryptography certificates: list a vendor's intermediate
    CAs as well as its roots) for the key of C{ekPublic}, a restricted
    decryption key, and C{akPublic} is a restricted signing key created in a
    TPM (fixedTPM, fixedParent, sensitiveDataOrigin) with a sha256 scheme.
    Both publics are marshalled TPM2B_PUBLIC.  The certificate's dates are
    not checked: EK certificates are made at manufacture and many carry
    dates no clock agrees with.
    """
    bounded("endorsement certificate", ekCertDer)
    ek = _public(ekPublic, "endorsement key")
    ak = _public(akPublic, "attestation key")
    try:
        certificate = x509.load_der_x509_certificate(ekCertDer)
        certKey = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise EvidenceError("format", f"the endorsement certificate is not a DER certificate ({e})") from None
    if not any(_issuedBy(certificate, ca) for ca in trustedCAs):
        raise EvidenceError("endorsement", "the endorsement certificate is not signed by a CA the operator trusts")
    if not _sameKey(certKey, publicKey(ek, "endorsement key")):
        raise EvidenceError("endorsement", "the endorsement certificate is for another key than the endorsement key sent")
    if not _hasAll(ek.objectAttributes, _STORAGE_KEY) or ek.objectAttributes & TPMA_OBJECT.SIGN_ENCRYPT:
        raise EvidenceError("endorsement", "the endorsement key is not a restricted decryption key fixed in its TPM")
    _checkAttestationKey(ak)
    return name(ak)


def _issuedBy(certificate, ca):
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _checkAttestationKey(ak):
    """EvidenceError("key") unless C{ak} is a restricted, sign-only key born in its TPM, with a sha256 scheme."""
    attributes = ak.objectAttributes
    if not _hasAll(attributes, _SIGN_KEY) or attributes & TPMA_OBJECT.DECRYPT:
        raise EvidenceError("key", "the attestation key is not a restricted signing key created in its TPM "
                                   "(restricted, sign only, fixedTPM, fixedParent, sensitiveDataOrigin)")
    publicKey(ak, "attestation key")
    scheme = _scheme(ak)
    allowed = {TPM2_ALG.RSA: (TPM2_ALG.RSASSA, TPM2_ALG.RSAPSS), TPM2_ALG.ECC: (TPM2_ALG.ECDSA,)}[ak.type]
    if scheme.scheme not in allowed or scheme.details.anySig.hashAlg != TPM2_ALG.SHA256:
        raise EvidenceError("key", "the attestation key's signing scheme is not RSASSA, RSA-PSS or ECDSA with sha256")


def _scheme(public):
    details = public.parameters.rsaDetail if public.type == TPM2_ALG.RSA else public.parameters.eccDetail
    return details.scheme


def makeChallenge(ekPublic, akName):
    """
    ({"credential_blob", "encrypted_secret"}, secret): TPM2_MakeCredential of a
    fresh random secret to the EK for the AK named C{akName}; only the TPM
    holding both can answer with the secret (L{checkActivation}).
    """
    ek = _public(ekPublic, "endorsement key")
    bounded("attestation key's name", akName, NAME_BYTES)
    if len(akName) != NAME_BYTES:
        raise EvidenceError("format", "the attestation key's name is not a sha256 TPM name")
    secret = os.urandom(SECRET_BYTES)
    try:
        blob, encrypted = make_credential(ek, secret, TPM2B_NAME(akName))
    except (ValueError, TypeError, TSS2_Exception) as e:
        raise EvidenceError("endorsement", f"no credential can be made for this endorsement key ({e})") from None
    return {"credential_blob": blob.marshal(), "encrypted_secret": encrypted.marshal()}, secret


def checkActivation(secret, answered):
    """EvidenceError("key") unless C{answered} is C{secret} (compared in constant time)."""
    if not isinstance(answered, bytes) or not hmac.compare_digest(secret, answered[:MAX_EVIDENCE]):
        raise EvidenceError("key", "the credential was not activated: the attestation key and the "
                                   "endorsement key are not in the same TPM")


# -- signed attestations -----------------------------------------------------

def _signedAttest(akPublic, attestBytes, signatureBytes, nonce, stType, what):
    """
    The TPMS_ATTEST of C{attestBytes} (a marshalled TPM2B_ATTEST) after its
    format, the AK's signature, the TPM_GENERATED magic, its type and its
    extraData (== C{nonce}) are checked, in this order.
    """
    ak = _public(akPublic, "attestation key")
    inner = bytes(unmarshal(TPM2B_ATTEST, attestBytes, what).attestationData)
    attest = unmarshal(TPMS_ATTEST, inner, what)
    signature = unmarshal(TPMT_SIGNATURE, signatureBytes, f"{what}'s signature")
    checkNonce(nonce)
    _verifySignature(ak, signature, inner, what)
    if attest.magic != TPM2_GENERATED.VALUE:
        raise EvidenceError("signature", f"the {what} was not made by a TPM (no TPM_GENERATED magic)")
    if attest.type != stType:
        raise EvidenceError("format", f"the {what} is an attestation of another type ({attest.type:#06x})")
    if not hmac.compare_digest(bytes(attest.extraData), nonce):
        raise EvidenceError("nonce", f"the {what}'s nonce is not the one asked for (a replayed {what})")
    return attest


def checkNonce(nonce):
    if not isinstance(nonce, bytes) or not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise EvidenceError("format", f"a nonce is {MIN_NONCE} to {MAX_NONCE} bytes")


def _verifySignature(ak, signature, data, what):
    """EvidenceError("signature") unless C{signature} (TPMT_SIGNATURE) is the AK's, in its scheme, over C{data}."""
    scheme = _scheme(ak)
    if signature.sigAlg != scheme.scheme:
        raise EvidenceError("signature", f"the {what} is not signed in the attestation key's scheme")
    key = publicKey(ak, "attestation key")
    try:
        if signature.sigAlg == TPM2_ALG.ECDSA:
            sig = signature.signature.ecdsa
            r, s = (int.from_bytes(bytes(v), "big") for v in (sig.signatureR, sig.signatureS))
            _sha256(sig.hash, what)
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
        else:
            sig = signature.signature.rsassa if signature.sigAlg == TPM2_ALG.RSASSA else signature.signature.rsapss
            _sha256(sig.hash, what)
            pad = padding.PKCS1v15() if signature.sigAlg == TPM2_ALG.RSASSA else padding.PSS(
                padding.MGF1(hashes.SHA256()), padding.PSS.AUTO)
            key.verify(bytes(sig.sig), data, pad, hashes.SHA256())
    except (InvalidSignature, ValueError):
        raise EvidenceError("signature", f"the {what}'s signature is not the attestation key's "
                                         "(signed by another TPM, or changed)") from None


def _sha256(hashAlg, what):
    if hashAlg != TPM2_ALG.SHA256:
        raise EvidenceError("signature", f"the {what} is not signed over sha256")


# -- quotes ------------------------------------------------------------------

@attr.s(frozen=True)
class Clock:
    """A TPM's clock at a quote: milliseconds powered, resets (reboots), restarts (resumes), safe."""
    clock = attr.ib()
    resetCount = attr.ib()
    restartCount = attr.ib()
    safe = attr.ib()

    def wentBackFrom(self, earlier):
        """Whether this clock is before C{earlier}, a clock of the same TPM seen before."""
        return (self.resetCount, self.restartCount, self.clock) < (
            earlier.resetCount, earlier.restartCount, earlier.clock)


@attr.s(frozen=True)
class Attested:
    """What a quote that passed proves: the PCRs, the log, and the digests the log names."""
    pcrs = attr.ib()
    """{pcr: sha256 value} of every PCR of L{PCRS}."""
    events = attr.ib()
    """The event log (clean event dicts), boot chain first."""
    clock = attr.ib()
    """The TPM's L{Clock} when it quoted."""
    client = attr.ib()
    """The client digests the log measures (a tuple, in order)."""
    qemu = attr.ib()
    """The QEMU digests the log measures."""
    images = attr.ib()
    """The images' sha256s the log measures."""


def checkPCRValues(pcrs):
    """C{pcrs} as {int: 32 bytes}, exactly the PCRs of L{PCRS}."""
    if not isinstance(pcrs, dict) or set(pcrs) != set(PCRS) or any(type(k) is not int for k in pcrs):
        raise EvidenceError("format", f"the PCR values are not exactly PCRs {list(PCRS)}")
    for index, value in pcrs.items():
        if not isinstance(value, bytes) or len(value) != 32:
            raise EvidenceError("format", f"PCR {index}'s value is not a sha256 digest")
    return {index: pcrs[index] for index in PCRS}


def pcrDigest(pcrs):
    """The sha256 of the values of L{PCRS} in order, as a quote and PolicyPCR take it."""
    return hashlib.sha256(b"".join(pcrs[index] for index in PCRS)).digest()


def verifyQuote(akPublic, quote, nonce, policy, previous=None):
    """
    The L{Attested} state of a quote C{quote} ({"attest", "signature",
    "pcrs", "events"}) by the AK C{akPublic} over C{nonce}, allowed by
    C{policy}; checks format and bounds, the signature, the TPM_GENERATED
    magic and QUOTE type, the nonce, the PCR selection, the PCR digest, that
    the log replays, and the policy, in this order.  With C{previous} (the
    L{Clock} of this TPM's last good quote), a clock that went back is refused.
    """
    if not isinstance(quote, dict) or set(quote) != {"attest", "signature", "pcrs", "events"}:
        raise EvidenceError("format", "the quote is not a dict of attest, signature, pcrs and events")
    pcrs = checkPCRValues(quote["pcrs"])
    events = checkEvents(quote["events"])
    attest = _signedAttest(akPublic, quote["attest"], quote["signature"], nonce, TPM2_ST.ATTEST_QUOTE, "quote")
    info = attest.attested.quote
    if info.pcrSelect.marshal() != PCR_SELECTION.marshal():
        raise EvidenceError("format", f"the quote covers other PCRs than sha256 {list(PCRS)}")
    if not hmac.compare_digest(bytes(info.pcrDigest), pcrDigest(pcrs)):
        raise EvidenceError("eventlog", "the PCR values sent are not the ones the TPM quoted")
    clock = Clock(attest.clockInfo.clock, attest.clockInfo.resetCount, attest.clockInfo.restartCount,
                  bool(attest.clockInfo.safe))
    if previous is not None and clock.wentBackFrom(previous):
        raise EvidenceError("nonce", "the TPM's clock is before its last quote's (a replayed quote)")
    replayed = replay(events)
    for index in (CLIENT_PCR, *BOOT_PCRS):
        if index in replayed or index == CLIENT_PCR:
            if not hmac.compare_digest(replayed.get(index, bytes(32)), pcrs[index]):
                raise EvidenceError("eventlog", f"the event log does not replay to the quoted PCR {index}")
    unexplained = [i for i in BOOT_PCRS if i not in replayed and pcrs[i] != bytes(32)]
    policy.check(events, unexplained=unexplained)

    def digests(kind):
        return tuple(e["digest"] for e in events if e["kind"] == kind)
    return Attested(pcrs=pcrs, events=events, clock=clock, client=digests("client"),
                    qemu=digests("qemu"), images=digests("image"))


# -- binding keys ------------------------------------------------------------

def pcrPolicyDigest(pcrs):
    """The authPolicy of a key usable only while L{PCRS} hold C{pcrs} (TPM2_PolicyPCR from a fresh session)."""
    pcrs = checkPCRValues(pcrs)
    return hashlib.sha256(bytes(32) + struct.pack(">I", TPM_CC_POLICY_PCR)
                          + PCR_SELECTION.marshal() + pcrDigest(pcrs)).digest()


def verifyBindingKey(akPublic, binding, nonce, pcrs):
    """
    C{binding["public"]} (a marshalled TPM2B_PUBLIC, what L{wrapSecret}
    takes) when the AK certified it (TPM2_Certify over C{nonce}) and it is a
    non-restricted RSA decryption key fixed in its TPM, usable only through
    its policy (userWithAuth clear), which is exactly PolicyPCR of C{pcrs}.
    """
    if not isinstance(binding, dict) or set(binding) != {"public", "certify", "signature"}:
        raise EvidenceError("format", "the binding key is not a dict of public, certify and signature")
    key = _public(binding["public"], "binding key")
    policy = pcrPolicyDigest(pcrs)
    attest = _signedAttest(akPublic, binding["certify"], binding["signature"], nonce,
                           TPM2_ST.ATTEST_CERTIFY, "binding key's certification")
    if not hmac.compare_digest(bytes(attest.attested.certify.name), name(key)):
        raise EvidenceError("key", "the attestation key certified another key than the binding key sent")
    attributes = key.objectAttributes
    if key.type != TPM2_ALG.RSA or not _hasAll(attributes, _BINDING_KEY) or attributes & (
            TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT):
        raise EvidenceError("key", "the binding key is not an RSA decryption key created in its TPM "
                                   "(not restricted, decrypt only, fixedTPM, fixedParent)")
    if attributes & TPMA_OBJECT.USERWITHAUTH:
        raise EvidenceError("key", "the binding key can be used with a password (userWithAuth), "
                                   "not only in the attested state")
    if _scheme(key).scheme not in (TPM2_ALG.NULL, TPM2_ALG.OAEP) or (
            _scheme(key).scheme == TPM2_ALG.OAEP and _scheme(key).details.anySig.hashAlg != TPM2_ALG.SHA256):
        raise EvidenceError("key", "the binding key's scheme is not OAEP with sha256")
    publicKey(key, "binding key")
    if not hmac.compare_digest(bytes(key.authPolicy), policy):
        raise EvidenceError("key", "the binding key's policy is not its TPM's PCRs in the attested state")
    return binding["public"]


def wrapSecret(keyPublic, secret):
    """C{secret} encrypted (RSA-OAEP, sha256, L{WRAP_LABEL}) to the binding key C{keyPublic}."""
    key = publicKey(_public(keyPublic, "binding key"), "binding key")
    room = key.key_size // 8 - 2 * 32 - 2
    if not isinstance(secret, bytes) or not 0 < len(secret) <= room:
        raise EvidenceError("format", f"a wrapped secret is 1 to {room} bytes")
    return key.encrypt(secret, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), WRAP_LABEL))


# -- the operator's policy ---------------------------------------------------

_NAMES = {"firmware": "the firmware's digest", "kernel": "the boot loader or kernel's digest",
          "qemu": "QEMU's digest", "client": "the client's digest"}


def _digestSet(values, kind):
    if not isinstance(values, (list, tuple, set, frozenset)) or len(values) > MAX_POLICY_DIGESTS:
        raise EvidenceError("format", f"the policy's {kind} is not a list of at most {MAX_POLICY_DIGESTS} digests")
    if not all(isinstance(v, str) and len(v) == 64 and not v.lower().strip("0123456789abcdef") for v in values):
        raise EvidenceError("format", f"the policy's {kind} holds something other than sha256 digests in hex")
    return frozenset(v.lower() for v in values)


@attr.s(frozen=True)
class Policy:
    """
    The digests the operator allows, by kind.  Every event of a kind must be
    listed; an empty C{firmware} or C{kernel} means any only when
    C{allow_any_firmware} says so (which also lets boot PCRs go without an
    event log).  C{qemu} and C{client} must be listed, and a quote must
    measure both.  Separators and images are not the operator's to allow
    (the buyer's order names its image).
    """
    firmware = attr.ib(default=frozenset(), converter=lambda v: _digestSet(v, "firmware"))
    kernel = attr.ib(default=frozenset(), converter=lambda v: _digestSet(v, "kernel"))
    qemu = attr.ib(default=frozenset(), converter=lambda v: _digestSet(v, "qemu"))
    client = attr.ib(default=frozenset(), converter=lambda v: _digestSet(v, "client"))
    allow_any_firmware = attr.ib(default=False, converter=bool)

    @classmethod
    def fromJSON(cls, text):
        """The policy of C{text}: {"firmware": [hex, ...], ..., "allow_any_firmware": false}."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not isinstance(text, str) or len(text) > MAX_POLICY:
            raise EvidenceError("format", f"the policy is not JSON text of at most {MAX_POLICY} bytes")
        try:
            document = json.loads(text)
        except ValueError as e:
            raise EvidenceError("format", f"the policy is not JSON ({e})") from None
        known = set(POLICY_KINDS) | {"allow_any_firmware"}
        if not isinstance(document, dict) or not set(document) <= known:
            raise EvidenceError("format", f"the policy is not an object of {', '.join(sorted(known))}")
        if not isinstance(document.get("allow_any_firmware", False), bool):
            raise EvidenceError("format", "the policy's allow_any_firmware is not true or false")
        return cls(**document)

    def toJSON(self):
        """The policy as JSON text, digests sorted (what L{fromJSON} reads)."""
        document = {kind: sorted(getattr(self, kind)) for kind in POLICY_KINDS}
        document["allow_any_firmware"] = self.allow_any_firmware
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    def check(self, events, unexplained=()):
        """
        EvidenceError("policy") naming the first event the policy does not
        allow, or the first of C{unexplained} boot PCRs (not zero, no events)
        unless any firmware is allowed.
        """
        if unexplained and not self.allow_any_firmware:
            raise EvidenceError("policy", f"PCR {unexplained[0]} has no boot event log, and the operator's "
                                          "policy does not allow any firmware")
        for event in checkEvents(events):
            kind = event["kind"]
            allowed = getattr(self, kind, None)
            if allowed is None or (not allowed and kind in ("firmware", "kernel") and self.allow_any_firmware):
                continue
            if event["digest"] not in allowed:
                raise EvidenceError("policy", f"{_NAMES[kind]} {event['digest'][:16]}... ({event['what']}) "
                                              "is not allowed by the operator's policy")
        for kind, thing in (("client", "client"), ("qemu", "QEMU binary")):
            if not any(e["kind"] == kind for e in events):
                raise EvidenceError("policy", f"the event log measures no {thing}: a trusted VM runs only "
                                              "under a client and a QEMU the operator allows")
