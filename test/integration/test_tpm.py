"""
The TPM layer against real software TPMs (swtpm, one per test, with an
endorsement certificate from the test's own CA and a synthetic boot chain
in PCRs 0-7: test/swtpm.py): what an honest seller's TPM proves, and each
thing a cheating seller, or a compromised market, can try, refused with its
reason and kind.
"""

import os
import queue
import stat
import threading

import pytest
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ATTEST, TPM2B_DATA, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPML_PCR_SELECTION, TPMT_SIG_SCHEME,
)
from twisted.internet import defer
from twisted.python.failure import Failure

from cpushare.attest import CLIENT_PCR, PCRS, EvidenceError, evidence, tpm as tpmlib
from cpushare.attest.evidence import Policy
from test.swtpm import makeCA, swtpms  # noqa: F401  (the fixture)

CLIENT, QEMU, IMAGE = "a" * 64, "b" * 64, "c" * 64
NULL_SCHEME = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)


def refused(kind, call, *args, **kwargs):
    """The reason of the EvidenceError C{call} raises, which must be of C{kind}."""
    with pytest.raises(EvidenceError) as caught:
        call(*args, **kwargs)
    assert caught.value.kind == kind, caught.value
    return str(caught.value)


class Seller:
    """A seller's open TPM, its home, and what it sent to enrol."""

    def __init__(self, software, home):
        self.software = software
        self.home = str(home)
        os.makedirs(self.home, exist_ok=True)
        self.tpm = tpmlib.open(software.spec, eventLog=software.eventLog)
        self.ekCert, self.ekPublic = self.tpm.endorsement()
        self.akPublic = self.tpm.attestationKey(self.home)

    def measureVM(self, qemu=QEMU, image=IMAGE):
        self.tpm.measure("client", CLIENT, "cpushare 0.1.0")
        self.tpm.measure("qemu", qemu, "/usr/bin/qemu-system-x86_64")
        self.tpm.measure("image", image, "lease 1")

    def close(self):
        self.tpm.close()


@pytest.fixture
def seller(swtpms, tmp_path):  # noqa: F811
    s = Seller(swtpms.make(), tmp_path / "seller")
    yield s
    s.close()


@pytest.fixture
def other(swtpms, tmp_path):  # noqa: F811
    """A second seller with a different TPM (certified by the same CA)."""
    s = Seller(swtpms.make(), tmp_path / "other")
    yield s
    s.close()


def policyFor(events, **changes):
    kinds = {kind: [e["digest"] for e in events if e["kind"] == kind] for kind in evidence.POLICY_KINDS}
    return Policy(**dict(kinds, **changes))


def quoted(seller):
    """(nonce, quote, policy allowing it) after the seller measured a VM."""
    seller.measureVM()
    nonce = os.urandom(32)
    quote = seller.tpm.quote(nonce)
    return nonce, quote, policyFor(quote["events"])


# -- enrolment ---------------------------------------------------------------

def test_an_honest_seller_enrols_and_activates_the_credential(seller, swtpms):  # noqa: F811
    akName = evidence.verifyEnrolment(seller.ekCert, seller.ekPublic, seller.akPublic, [swtpms.ca])
    assert akName == evidence.name(TPM2B_PUBLIC.unmarshal(seller.akPublic)[0].publicArea)
    challenge, secret = evidence.makeChallenge(seller.ekPublic, akName)
    assert set(challenge) == {"credential_blob", "encrypted_secret"} and len(secret) == 32
    evidence.checkActivation(secret, seller.tpm.activate(challenge))


def test_an_endorsement_certificate_from_an_unknown_ca_is_refused(seller, tmp_path):
    _, stranger = makeCA(str(tmp_path / "stranger"), name="CPUShare test TPM CA")
    assert refused("endorsement", evidence.verifyEnrolment, seller.ekCert, seller.ekPublic,
                   seller.akPublic, [stranger]) == \
        "the endorsement certificate is not signed by a CA the operator trusts"


def test_an_endorsement_certificate_of_another_key_is_refused(seller, other, swtpms):  # noqa: F811
    assert "for another key than the endorsement key sent" in refused(
        "endorsement", evidence.verifyEnrolment, seller.ekCert, other.ekPublic, other.akPublic, [swtpms.ca])


def test_a_challenge_answered_by_another_tpm_fails(seller, other, swtpms):  # noqa: F811
    # A seller presents its genuine EK with an AK of another TPM it controls.
    akName = evidence.verifyEnrolment(seller.ekCert, seller.ekPublic, other.akPublic, [swtpms.ca])
    challenge, secret = evidence.makeChallenge(seller.ekPublic, akName)
    assert "cannot activate the credential" in refused("key", other.tpm.activate, challenge)
    assert "cannot activate the credential" in refused("key", seller.tpm.activate, challenge)
    # And whatever it answers instead is not the secret.
    assert "not in the same TPM" in refused("key", evidence.checkActivation, secret, os.urandom(32))


def test_a_signing_key_that_is_not_restricted_is_no_attestation_key(seller, swtpms):  # noqa: F811
    loose = TPM2B_PUBLIC.parse("rsa2048:rsassa-sha256:null", objectAttributes=(
        TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH))
    _, public, _, _, _ = seller.tpm.esapi.create(seller.tpm.parent, TPM2B_SENSITIVE_CREATE(), loose)
    assert "not a restricted signing key" in refused(
        "key", evidence.verifyEnrolment, seller.ekCert, seller.ekPublic, public.marshal(), [swtpms.ca])
    # Nor is the EK itself (a decryption key).
    assert "not a restricted signing key" in refused(
        "key", evidence.verifyEnrolment, seller.ekCert, seller.ekPublic, seller.ekPublic, [swtpms.ca])


def test_malformed_enrolment_is_refused(seller, swtpms):  # noqa: F811
    assert "not a DER certificate" in refused(
        "format", evidence.verifyEnrolment, b"\x30\x03junk", seller.ekPublic, seller.akPublic, [swtpms.ca])
    assert "more than the 16384 allowed" in refused(
        "format", evidence.verifyEnrolment, b"\x30" * 16385, seller.ekPublic, seller.akPublic, [swtpms.ca])
    assert "after its TPM2B_PUBLIC" in refused(
        "format", evidence.verifyEnrolment, seller.ekCert, seller.ekPublic + b"\x00", seller.akPublic,
        [swtpms.ca])
    assert "not a sha256 TPM name" in refused("format", evidence.makeChallenge, seller.ekPublic, b"\x00\x0b")


# -- quotes ------------------------------------------------------------------

def test_a_quote_verifies_and_says_what_runs(seller):
    nonce, quote, policy = quoted(seller)
    attested = evidence.verifyQuote(seller.akPublic, quote, nonce, policy)
    assert (attested.client, attested.qemu, attested.images) == ((CLIENT,), (QEMU,), (IMAGE,))
    assert {e["kind"] for e in attested.events} >= {"firmware", "kernel", "separator", "client"}
    assert all(attested.pcrs[i] != bytes(32) for i in PCRS)
    # A later quote's clock goes on from this one's.
    nonce2 = os.urandom(32)
    later = evidence.verifyQuote(seller.akPublic, seller.tpm.quote(nonce2), nonce2, policy,
                                 previous=attested.clock)
    assert later.clock.clock >= attested.clock.clock
    assert "clock is before its last quote" in refused(
        "nonce", evidence.verifyQuote, seller.akPublic, quote, nonce, policy, previous=later.clock)


def test_a_replayed_quote_is_refused(seller):
    nonce, quote, policy = quoted(seller)
    assert refused("nonce", evidence.verifyQuote, seller.akPublic, quote, os.urandom(32), policy) == \
        "the quote's nonce is not the one asked for (a replayed quote)"


def test_a_quote_signed_by_another_tpm_is_refused(seller, other):
    other.measureVM()
    nonce = os.urandom(32)
    quote = other.tpm.quote(nonce)
    assert "not the attestation key's (signed by another TPM, or changed)" in refused(
        "signature", evidence.verifyQuote, seller.akPublic, quote, nonce, policyFor(quote["events"]))


def test_data_the_ak_signed_outside_a_quote_is_refused(seller):
    # A restricted AK signs any digest the TPM hashed itself, unless the data
    # starts with TPM_GENERATED: so a forged attestation without the magic.
    nonce, quote, policy = quoted(seller)
    inner = bytearray(TPM2B_ATTEST.unmarshal(quote["attest"])[0].attestationData)
    inner[0:4] = bytes(4)
    esapi = seller.tpm.esapi
    digest, ticket = esapi.hash(bytes(inner), TPM2_ALG.SHA256, ESYS_TR.OWNER)
    signature = esapi.sign(seller.tpm._ak, digest, NULL_SCHEME, ticket)
    forged = dict(quote, attest=TPM2B_ATTEST(attestationData=bytes(inner)).marshal(),
                  signature=signature.marshal())
    assert "no TPM_GENERATED magic" in refused("signature", evidence.verifyQuote, seller.akPublic,
                                               forged, nonce, policy)


def test_an_event_log_that_does_not_replay_is_refused(seller):
    nonce, quote, policy = quoted(seller)
    events = quote["events"]
    dropped = [e for e in events if e["kind"] != "image"]
    assert refused("eventlog", evidence.verifyQuote, seller.akPublic, dict(quote, events=dropped),
                   nonce, policy) == f"the event log does not replay to the quoted PCR {CLIENT_PCR}"
    changed = [dict(e, what="/opt/other/qemu") if e["kind"] == "qemu" else e for e in events]
    assert f"quoted PCR {CLIENT_PCR}" in refused(
        "eventlog", evidence.verifyQuote, seller.akPublic, dict(quote, events=changed), nonce, policy)
    noKernel = [e for e in events if e["kind"] != "kernel"]
    assert "quoted PCR 4" in refused(
        "eventlog", evidence.verifyQuote, seller.akPublic, dict(quote, events=noKernel), nonce, policy)


def test_a_boot_chain_without_its_log_passes_only_if_any_firmware_is_allowed(seller):
    nonce, quote, policy = quoted(seller)
    clientOnly = dict(quote, events=[e for e in quote["events"] if e["pcr"] == CLIENT_PCR])
    assert "PCR 0 has no boot event log" in refused(
        "policy", evidence.verifyQuote, seller.akPublic, clientOnly, nonce, policy)
    evidence.verifyQuote(seller.akPublic, clientOnly, nonce, Policy(
        qemu=policy.qemu, client=policy.client, allow_any_firmware=True))


def test_a_qemu_or_client_the_policy_does_not_allow_is_refused(seller):
    seller.tpm.measure("client", CLIENT, "cpushare 0.1.0")
    seller.tpm.measure("qemu", "d" * 64, "/home/seller/patched-qemu")
    nonce = os.urandom(32)
    quote = seller.tpm.quote(nonce)
    policy = policyFor(quote["events"], qemu=[QEMU])
    assert refused("policy", evidence.verifyQuote, seller.akPublic, quote, nonce, policy) == (
        "QEMU's digest dddddddddddddddd... (/home/seller/patched-qemu) is not allowed by the operator's policy")
    assert "the client's digest" in refused("policy", evidence.verifyQuote, seller.akPublic, quote, nonce,
                                            policyFor(quote["events"], client=["e" * 64]))


def test_a_quote_of_other_pcrs_is_refused(seller):
    nonce, quote, policy = quoted(seller)
    attest, signature = seller.tpm.esapi.quote(seller.tpm._ak, TPML_PCR_SELECTION.parse("sha256:0,1,2,3,4,5,6,7"),
                                               TPM2B_DATA(nonce), NULL_SCHEME)
    narrow = dict(quote, attest=attest.marshal(), signature=signature.marshal())
    assert f"covers other PCRs than sha256 {list(PCRS)}" in refused(
        "format", evidence.verifyQuote, seller.akPublic, narrow, nonce, policy)


def test_a_certification_is_not_a_quote(seller):
    nonce, quote, policy = quoted(seller)
    binding = seller.tpm.bindingKey(nonce, quote["pcrs"])
    asQuote = dict(quote, attest=binding["certify"], signature=binding["signature"])
    assert "an attestation of another type" in refused(
        "format", evidence.verifyQuote, seller.akPublic, asQuote, nonce, policy)


def test_oversized_or_malformed_quotes_are_refused(seller):
    nonce, quote, policy = quoted(seller)
    for change, reason in [
        (dict(attest=b"\x01" * 20000), "more than the 16384 allowed"),
        (dict(attest=quote["attest"][:-1]), "not a marshalled TPM2B_ATTEST"),
        (dict(events=quote["events"] * 40), "more than the 512 allowed"),
        (dict(pcrs={str(k): v for k, v in quote["pcrs"].items()}), "not exactly PCRs"),
    ]:
        assert reason in refused("format", evidence.verifyQuote, seller.akPublic, dict(quote, **change),
                                 nonce, policy)


# -- binding keys ------------------------------------------------------------

def attestedBinding(seller):
    nonce, quote, policy = quoted(seller)
    attested = evidence.verifyQuote(seller.akPublic, quote, nonce, policy)
    bindNonce = os.urandom(32)
    return attested, bindNonce, seller.tpm.bindingKey(bindNonce, attested.pcrs)


def test_a_secret_wrapped_to_a_binding_key_unwraps_only_in_the_attested_state(seller):
    attested, nonce, binding = attestedBinding(seller)
    keyPublic = evidence.verifyBindingKey(seller.akPublic, binding, nonce, attested.pcrs)
    wrapped = evidence.wrapSecret(keyPublic, b"the image's key, 32 bytes long!!")
    assert seller.tpm.unwrap(binding, wrapped) == b"the image's key, 32 bytes long!!"
    # The seller starts something else under the client PCR: the TPM refuses.
    seller.tpm.measure("qemu", "d" * 64, "/home/seller/patched-qemu")
    assert refused("key", seller.tpm.unwrap, binding, wrapped) == (
        "the TPM refuses to unwrap the secret: its PCRs are no longer in the attested state")
    # Nor does resetting the PCR bring the attested state back.
    seller.tpm.resetClientPCR()
    assert "no longer in the attested state" in refused("key", seller.tpm.unwrap, binding, wrapped)


def test_a_binding_key_for_other_pcrs_or_nonce_is_refused(seller):
    attested, nonce, binding = attestedBinding(seller)
    otherPCRs = {**attested.pcrs, CLIENT_PCR: bytes(32)}
    assert refused("key", evidence.verifyBindingKey, seller.akPublic, binding, nonce, otherPCRs) == \
        "the binding key's policy is not its TPM's PCRs in the attested state"
    assert "a replayed binding key's certification" in refused(
        "nonce", evidence.verifyBindingKey, seller.akPublic, binding, os.urandom(32), attested.pcrs)


def test_a_binding_key_usable_with_a_password_is_refused(seller):
    attested, nonce, _ = attestedBinding(seller)
    esapi, tpm = seller.tpm.esapi, seller.tpm
    template = TPM2B_PUBLIC.parse("rsa2048:null:null", objectAttributes=(
        TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH),
        authPolicy=evidence.pcrPolicyDigest(attested.pcrs))
    private, public, _, _, _ = esapi.create(tpm.parent, TPM2B_SENSITIVE_CREATE(), template)
    handle = esapi.load(tpm.parent, private, public)
    certify, signature = esapi.certify(handle, tpm._ak, TPM2B_DATA(nonce), NULL_SCHEME)
    esapi.flush_context(handle)
    loose = {"public": public.marshal(), "certify": certify.marshal(), "signature": signature.marshal()}
    assert "can be used with a password (userWithAuth)" in refused(
        "key", evidence.verifyBindingKey, seller.akPublic, loose, nonce, attested.pcrs)


def test_a_binding_key_swapped_for_another_is_refused(seller):
    attested, nonce, binding = attestedBinding(seller)
    second = seller.tpm.bindingKey(nonce, attested.pcrs)
    swapped = dict(binding, public=second["public"])
    assert refused("key", evidence.verifyBindingKey, seller.akPublic, swapped, nonce, attested.pcrs) == \
        "the attestation key certified another key than the binding key sent"


def test_what_a_compromised_market_may_ask_is_bounded(seller, other):
    attested, nonce, binding = attestedBinding(seller)
    assert "16 to 64 bytes" in refused("format", seller.tpm.quote, b"\x00" * 65)
    assert "16 to 64 bytes" in refused("format", seller.tpm.bindingKey, b"", attested.pcrs)
    # A key for PCR values the TPM does not hold now.
    assert "the PCRs changed" in refused("key", seller.tpm.bindingKey, nonce,
                                         {**attested.pcrs, 0: bytes(32)})
    # Unwrapping with a binding key of another TPM, or a made-up one.
    otherAttested, otherNonce, otherBinding = attestedBinding(other)
    assert "made no such binding key" in refused("key", seller.tpm.unwrap, otherBinding, b"\x00" * 256)
    assert "made no such binding key" in refused("key", seller.tpm.unwrap, {"public": b"x"}, b"\x00" * 256)
    assert "256 bytes" in refused("format", seller.tpm.unwrap, binding, b"\x00" * 300)
    # Garbage the TPM cannot decrypt.
    assert "cannot unwrap" in refused("key", seller.tpm.unwrap, binding, b"\x01" * 256)
    assert "not a dict of credential_blob" in refused("format", seller.tpm.activate, {"x": b""})
    assert "not a marshalled TPM2B_ID_OBJECT" in refused(
        "format", seller.tpm.activate, {"credential_blob": b"\xff\xff", "encrypted_secret": b""})


# -- the seller's TPM object ---------------------------------------------------

def test_the_attestation_key_survives_a_restart(seller):
    nonce, quote, policy = quoted(seller)
    seller.close()
    for name in tpmlib.AK_FILES:
        assert stat.S_IMODE(os.stat(os.path.join(seller.home, name)).st_mode) == 0o600
    again = Seller(seller.software, seller.home)
    try:
        assert again.akPublic == seller.akPublic
        nonce, quote, policy = quoted(again)
        evidence.verifyQuote(seller.akPublic, quote, nonce, policy)
    finally:
        again.close()
    seller.tpm = tpmlib.open(seller.software.spec)   # for the fixture's teardown


def test_an_attestation_key_of_another_tpm_is_not_loaded(seller, other):
    seller.close()
    stolen = tpmlib.open(other.software.spec)
    try:
        assert "is not this TPM's" in refused("tpm", stolen.attestationKey, seller.home)
    finally:
        stolen.close()
    seller.tpm = tpmlib.open(seller.software.spec)


def test_opening_what_is_not_a_tpm_says_so(tmp_path):
    assert refused("tpm", tpmlib.open, str(tmp_path / "tpm0")).startswith(
        f"there is no TPM at {tmp_path / 'tpm0'}")
    (tmp_path / "file").write_bytes(b"")
    assert "is not a TPM: it is not a character device" in refused("tpm", tpmlib.open, str(tmp_path / "file"))
    assert "neither a TPM device's path" in refused("tpm", tpmlib.open, "tpm0")
    assert "does not answer as a TPM 2.0" in refused("tpm", tpmlib.open, "/dev/zero")
    assert "cannot reach the TPM" in refused("tpm", tpmlib.open, "swtpm:host=127.0.0.1,port=1")


def test_the_client_log_is_bounded_and_reset(seller):
    for i in range(tpmlib.MAX_CLIENT_EVENTS):
        seller.tpm.events.append({"pcr": CLIENT_PCR, "kind": "image", "digest": IMAGE, "what": str(i)})
    assert "reset PCR 23 when no VM runs" in refused("format", seller.tpm.measure, "qemu", QEMU, "x")
    seller.tpm.resetClientPCR()
    assert seller.tpm.events == [] and seller.tpm.pcrValues()[CLIENT_PCR] == bytes(32)
    assert "PCR 23 takes client, qemu, image" in refused("format", seller.tpm.measure, "kernel", QEMU, "x")


class ThreadReactor:
    """Just what TPMService uses of a reactor: calls from its thread queue here, run by the test."""

    def __init__(self):
        self.calls = queue.Queue()
        self.triggers = []

    def callFromThread(self, f, *args, **kwargs):
        self.calls.put((f, args, kwargs))

    def addSystemEventTrigger(self, *args):
        self.triggers.append(args)
        return len(self.triggers)

    def removeSystemEventTrigger(self, trigger):
        self.triggers[trigger - 1] = None

    def wait(self, d):
        results = []
        d.addBoth(results.append)
        while not results:
            f, args, kwargs = self.calls.get(timeout=30)
            f(*args, **kwargs)
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]


def test_the_service_runs_each_call_on_its_own_thread(swtpms, tmp_path):  # noqa: F811
    software = swtpms.make()
    reactor = ThreadReactor()
    threads = set()

    def opener(spec, eventLog):
        threads.add(threading.get_ident())
        return tpmlib.open(spec, eventLog=eventLog)
    service = tpmlib.TPMService(reactor, software.spec, str(tmp_path), eventLog=software.eventLog,
                                opener=opener)
    akPublic = reactor.wait(service.attestationKey())
    for kind, digest in (("client", CLIENT), ("qemu", QEMU)):
        reactor.wait(service.measure(kind, digest, kind))
    nonce = os.urandom(32)
    quote = reactor.wait(service.quote(nonce))
    evidence.verifyQuote(akPublic, quote, nonce, policyFor(quote["events"]))
    with pytest.raises(EvidenceError) as caught:
        reactor.wait(service.quote(b"short"))
    assert caught.value.kind == "format"
    assert threads and threading.get_ident() not in threads
    reactor.wait(defer.maybeDeferred(service.stopService))
    assert reactor.triggers == [None]
