"""
The pure parts of cpushare/attest, without a TPM: event logs and their
replay, the TCG log parser, the operator's policy, and the market's checks
of quotes forged in software by a signing key that plays the AK (what a
cheating seller can make without a TPM).  test/integration/test_tpm.py runs
the same checks against real software TPMs.
"""

import functools
import hashlib
import json
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings, strategies as st
from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ATTEST, TPM2B_DATA, TPM2B_DIGEST, TPM2B_PUBLIC, TPM2B_PUBLIC_KEY_RSA, TPML_PCR_SELECTION,
    TPMS_ATTEST, TPMT_SIGNATURE,
)

from cpushare.attest import CLIENT_PCR, MAX_EVENTS, MAX_EVIDENCE, PCRS, EvidenceError
from cpushare.attest import eventlog, evidence
from cpushare.attest.evidence import Policy
from test.swtpm import BOOT_EVENTS, EV_EFI_BOOT_SERVICES_APPLICATION, EV_NO_ACTION, tcgLog

QEMU, CLIENT, IMAGE = "b" * 64, "a" * 64, "c" * 64


def refused(kind, call, *args, **kwargs):
    """The reason of the EvidenceError C{call} raises, which must be of C{kind}."""
    with pytest.raises(EvidenceError) as caught:
        call(*args, **kwargs)
    assert caught.value.kind == kind, caught.value
    return str(caught.value)


def clientEvents():
    return [eventlog.clientEvent("client", CLIENT, "cpushare 0.1.0"),
            eventlog.clientEvent("qemu", QEMU, "/usr/bin/qemu-system-x86_64"),
            eventlog.clientEvent("image", IMAGE, "lease 7")]


# -- event logs --------------------------------------------------------------

def test_the_client_pcr_replays_as_the_documented_chain_of_sha256():
    events = clientEvents()
    value = bytes(32)
    for e in events:
        value = hashlib.sha256(value + hashlib.sha256(
            f"{e['kind']}:{e['digest']}:{e['what']}".encode()).digest()).digest()
    assert eventlog.replay(events) == {CLIENT_PCR: value}
    assert eventlog.replay(events[::-1]) != {CLIENT_PCR: value}


@pytest.mark.parametrize("change, reason", [
    (dict(pcr=9), "names PCR 9"),
    (dict(pcr="23"), "names PCR '23'"),
    (dict(kind="firmware"), "PCR 23 takes client, qemu, image"),
    (dict(digest="A" * 64), "lowercase hex"),
    (dict(digest="a" * 63), "lowercase hex"),
    (dict(what="x" * 257), "at most 256"),
    (dict(what="evil\nline"), "printable"),
    (dict(extra=1), "not a dict of pcr, kind, digest and what"),
])
def test_a_malformed_event_is_refused_naming_the_problem(change, reason):
    event = dict(clientEvents()[0], **change)
    assert reason in refused("format", eventlog.replay, [event])


def test_an_event_log_is_bounded():
    events = clientEvents()[:1] * (MAX_EVENTS + 1)
    assert "more than the 512 allowed" in refused("format", eventlog.replay, events)
    assert "not a list" in refused("format", eventlog.replay, "events")


def test_the_tcg_log_gives_the_boot_chain_with_kinds_and_replays_to_the_firmware_pcrs():
    log = tcgLog(BOOT_EVENTS + [(9, 0xD, b"grub command"), (0, EV_NO_ACTION, b"StartupLocality")])
    events = eventlog.parseTCG(log)
    assert [(e["pcr"], e["kind"], e["what"]) for e in events[:3]] == [
        (0, "firmware", "EV_S_CRTM_VERSION"), (0, "firmware", "EV_POST_CODE"),
        (1, "firmware", "EV_EFI_VARIABLE_DRIVER_CONFIG")]
    assert {e["kind"] for e in events if e["what"] == "EV_SEPARATOR"} == {"separator"}
    assert events[-1] == {"pcr": 4, "kind": "kernel", "what": "EV_EFI_BOOT_SERVICES_APPLICATION",
                          "digest": hashlib.sha256(b"test vmlinuz").hexdigest()}
    assert len(events) == len(BOOT_EVENTS)   # PCR 9 and EV_NO_ACTION left out
    expected = {}
    for pcr, _, data in BOOT_EVENTS:
        expected[pcr] = hashlib.sha256(expected.get(pcr, bytes(32)) + hashlib.sha256(data).digest()).digest()
    assert eventlog.replay(events) == expected


def test_a_truncated_tcg_log_is_refused_or_parses_to_fewer_events():
    log = tcgLog(BOOT_EVENTS)
    whole = eventlog.parseTCG(log)
    for cut in range(len(log)):
        try:
            events = eventlog.parseTCG(log[:cut])
        except EvidenceError as e:
            assert e.kind == "format"
        else:
            assert events == whole[:len(events)]


@pytest.mark.parametrize("log, reason", [
    (b"", "ends inside the header event"),
    (struct.pack("<II20sI", 0, 1, bytes(20), 0), "does not start with a Spec ID event"),
    (struct.pack("<II20sI", 0, 3, bytes(20), 16) + b"Spec ID Event02\x00", "not crypto-agile"),
    (tcgLog([])[:56] + struct.pack("<I", 99) + tcgLog([])[60:], "lists 99 digest algorithms"),
    (tcgLog([]) + struct.pack("<III", 0, 1, 3), "more than the header's 2"),
    (tcgLog([]) + struct.pack("<IIIH", 0, 1, 1, 0x0C), "algorithm 0x000c the header does not list"),
    (tcgLog([]) + struct.pack("<IIIH20sI", 0, 1, 1, 4, bytes(20), 0), "has no sha256 digest"),
    (b"\x00" * (eventlog.MAX_TCG_LOG + 1), "more than the 1048576 allowed"),
    (tcgLog([(0, 1, b"x")] * (eventlog.MAX_BOOT_EVENTS + 1)), "more than 384 boot-chain events"),
])
def test_a_malformed_tcg_log_is_refused_naming_the_problem(log, reason):
    assert reason in refused("format", eventlog.parseTCG, log)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.integers(0, 400))
def test_the_tcg_parser_never_fails_otherwise_than_by_a_format_error(noise, at):
    log = tcgLog(BOOT_EVENTS)
    for data in (noise, log[:at] + noise + log[at + len(noise):]):
        try:
            events = eventlog.parseTCG(data)
        except EvidenceError as e:
            assert e.kind == "format"
        else:
            assert eventlog.checkEvents(events) == events


# -- the policy --------------------------------------------------------------

def bootEvents():
    return eventlog.parseTCG(tcgLog(BOOT_EVENTS))


def listing(events, **changes):
    kinds = {kind: [e["digest"] for e in events if e["kind"] == kind] for kind in evidence.POLICY_KINDS}
    return Policy(**dict(kinds, **changes))


def test_the_policy_allows_what_it_lists_and_names_what_it_does_not():
    events = bootEvents() + clientEvents()
    listing(events).check(events)
    reason = refused("policy", listing(events, qemu=["d" * 64]).check, events)
    assert reason == ("QEMU's digest bbbbbbbbbbbbbbbb... (/usr/bin/qemu-system-x86_64) "
                      "is not allowed by the operator's policy")
    assert "the client's digest aaaa" in refused("policy", listing(events, client=[]).check, events)
    kernel = refused("policy", listing(events, kernel=[]).check, events)
    assert "the boot loader or kernel's digest" in kernel and "EV_EFI_BOOT_SERVICES_APPLICATION" in kernel


def test_any_firmware_only_when_the_operator_says_so():
    events = bootEvents() + clientEvents()
    strict = listing(events, firmware=[], kernel=[])
    assert "the firmware's digest" in refused("policy", strict.check, events)
    listing(events, firmware=[], kernel=[], allow_any_firmware=True).check(events)
    # Listed digests still bind when any is allowed for the other boot kind.
    assert "kernel" in refused("policy", listing(events, firmware=[], kernel=["e" * 64],
                                                 allow_any_firmware=True).check, events)
    # Boot PCRs without a log are refused unless any firmware is allowed.
    assert "PCR 0 has no boot event log" in refused("policy", strict.check, clientEvents(), unexplained=[0])
    listing(events, allow_any_firmware=True).check(clientEvents(), unexplained=[0])


def test_a_quote_must_measure_the_client_and_qemu():
    events = clientEvents()
    assert "measures no QEMU" in refused("policy", listing(events).check, [events[0], events[2]])
    assert "measures no client" in refused("policy", listing(events).check, events[1:])


def test_the_policy_goes_through_json_and_refuses_what_it_cannot_read():
    policy = listing(bootEvents() + clientEvents(), allow_any_firmware=True)
    text = policy.toJSON()
    assert Policy.fromJSON(text) == policy
    assert json.loads(text)["qemu"] == [QEMU]
    assert Policy.fromJSON('{"qemu": ["%s"]}' % QEMU.upper()).qemu == {QEMU}
    for bad, reason in [
        ("{", "not JSON"), ("[]", "not an object"), ('{"kernels": []}', "not an object"),
        ('{"qemu": ["xyz"]}', "other than sha256 digests"), ('{"qemu": "%s"}' % QEMU, "not a list"),
        ('{"qemu": [1]}', "other than sha256 digests"),
        ('{"allow_any_firmware": "yes"}', "true or false"),
        (" " * (evidence.MAX_POLICY + 1), "at most"),
    ]:
        assert reason in refused("format", Policy.fromJSON, bad), bad
    assert Policy() == Policy.fromJSON("{}") and not Policy().allow_any_firmware


# -- quotes forged in software -----------------------------------------------

class SoftwareAK:
    """An RSA key with an AK's public area: signs whatever a cheating seller builds."""

    def __init__(self, attributes=None):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = TPM2B_PUBLIC.parse("rsa2048:rsassa-sha256:null", objectAttributes=attributes or (
            TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH))
        public.publicArea.unique.rsa = TPM2B_PUBLIC_KEY_RSA(
            self.key.public_key().public_numbers().n.to_bytes(256, "big"))
        self.public = public.marshal()

    def sign(self, attest):
        data = attest.marshal()
        signature = TPMT_SIGNATURE(sigAlg=TPM2_ALG.RSASSA)
        signature.signature.rsassa.hash = TPM2_ALG.SHA256
        signature.signature.rsassa.sig = TPM2B_PUBLIC_KEY_RSA(
            self.key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
        return TPM2B_ATTEST(attestationData=data).marshal(), signature.marshal()


def forgedQuote(ak, nonce, events, magic=TPM2_GENERATED.VALUE, stType=TPM2_ST.ATTEST_QUOTE,
                selection=evidence.PCR_SELECTION):
    pcrs = {i: bytes(32) for i in PCRS}
    pcrs.update(eventlog.replay(events))
    attest = TPMS_ATTEST(magic=magic, type=stType, extraData=TPM2B_DATA(nonce))
    attest.clockInfo.clock = 1000
    attest.attested.quote.pcrSelect = selection
    attest.attested.quote.pcrDigest = TPM2B_DIGEST(evidence.pcrDigest(pcrs))
    signed, signature = ak.sign(attest)
    return {"attest": signed, "signature": signature, "pcrs": pcrs, "events": events}


@functools.lru_cache(maxsize=None)
def sharedAK():
    return SoftwareAK()


@pytest.fixture
def ak():
    return sharedAK()


def test_a_well_formed_quote_passes_and_says_what_it_measured(ak):
    nonce = os.urandom(32)
    events = bootEvents() + clientEvents()
    attested = evidence.verifyQuote(ak.public, forgedQuote(ak, nonce, events), nonce, listing(events))
    assert (attested.client, attested.qemu, attested.images) == ((CLIENT,), (QEMU,), (IMAGE,))
    assert attested.clock.clock == 1000 and attested.events == events


def test_what_no_tpm_would_sign_is_refused(ak):
    nonce, events = os.urandom(32), clientEvents()
    policy = listing(events, allow_any_firmware=True)
    assert "no TPM_GENERATED magic" in refused(
        "signature", evidence.verifyQuote, ak.public, forgedQuote(ak, nonce, events, magic=0), nonce, policy)
    assert "another type" in refused(
        "format", evidence.verifyQuote, ak.public,
        forgedQuote(ak, nonce, events, stType=TPM2_ST.ATTEST_TIME), nonce, policy)
    assert "covers other PCRs" in refused(
        "format", evidence.verifyQuote, ak.public,
        forgedQuote(ak, nonce, events, selection=TPML_PCR_SELECTION.parse("sha256:23")), nonce, policy)
    assert "a replayed quote" in refused(
        "nonce", evidence.verifyQuote, ak.public, forgedQuote(ak, nonce, events), os.urandom(32), policy)


def test_pcr_values_that_are_not_the_quoted_ones_are_refused(ak):
    nonce, events = os.urandom(32), clientEvents()
    quote = forgedQuote(ak, nonce, events)
    quote["pcrs"] = {**quote["pcrs"], CLIENT_PCR: bytes(32)}
    assert "not the ones the TPM quoted" in refused(
        "eventlog", evidence.verifyQuote, ak.public, quote, nonce, listing(events))


def test_a_clock_that_went_back_is_a_replayed_quote(ak):
    nonce, events = os.urandom(32), clientEvents()
    later = evidence.Clock(clock=2000, resetCount=0, restartCount=0, safe=True)
    assert "clock is before its last quote" in refused(
        "nonce", evidence.verifyQuote, ak.public, forgedQuote(ak, nonce, events), nonce, listing(events),
        previous=later)
    earlierBoot = evidence.Clock(clock=99999, resetCount=-1, restartCount=0, safe=True)
    evidence.verifyQuote(ak.public, forgedQuote(ak, nonce, events), nonce, listing(events),
                         previous=earlierBoot)


@pytest.mark.parametrize("change, kind, reason", [
    (dict(attest=b"\x00" * (MAX_EVIDENCE + 1)), "format", "more than the 16384 allowed"),
    (dict(attest=b"\x00\x05abc"), "format", "not a marshalled TPM2B_ATTEST"),
    (dict(signature=b"junk"), "format", "not a marshalled TPMT_SIGNATURE"),
    (dict(attest="text"), "format", "not bytes"),
    (dict(pcrs={23: bytes(32)}), "format", "not exactly PCRs"),
    (dict(pcrs={i: b"x" for i in PCRS}), "format", "not a sha256 digest"),
    (dict(events=[{}]), "format", "not a dict of pcr"),
    (dict(extra=1), "format", "not a dict of attest, signature"),
])
def test_malformed_or_oversized_quotes_are_refused(ak, change, kind, reason):
    nonce, events = os.urandom(32), clientEvents()
    quote = dict(forgedQuote(ak, nonce, events), **change)
    assert reason in refused(kind, evidence.verifyQuote, ak.public, quote, nonce, listing(events))


def test_trailing_bytes_after_a_structure_are_refused(ak):
    nonce, events = os.urandom(32), clientEvents()
    quote = forgedQuote(ak, nonce, events)
    quote["signature"] += b"\x00"
    assert "1 bytes after its TPMT_SIGNATURE" in refused(
        "format", evidence.verifyQuote, ak.public, quote, nonce, listing(events))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["attest", "signature"]), st.integers(0, 300), st.binary(min_size=1, max_size=8))
def test_a_changed_byte_anywhere_is_refused_with_a_reason(ak, field, at, noise):
    nonce, events = b"n" * 32, clientEvents()
    quote = forgedQuote(ak, nonce, events)
    data = quote[field]
    at %= len(data)
    changed = data[:at] + bytes(a ^ b for a, b in zip(data[at:at + len(noise)], noise)) + data[at + len(noise):]
    if changed == data:
        return
    try:
        evidence.verifyQuote(ak.public, dict(quote, **{field: changed}), nonce, listing(events))
    except EvidenceError as e:
        assert e.kind in ("format", "signature", "nonce", "eventlog", "policy")
    else:
        pytest.fail("a changed quote passed")


def test_a_key_that_can_sign_anything_is_no_attestation_key():
    loose = SoftwareAK(attributes=TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                       | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)
    assert "not a restricted signing key" in refused("key", evidence._checkAttestationKey,
                                                     TPM2B_PUBLIC.unmarshal(loose.public)[0].publicArea)


def test_a_secret_is_wrapped_with_oaep_sha256_and_the_label():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = TPM2B_PUBLIC.parse("rsa2048:null:null", objectAttributes=TPMA_OBJECT.DECRYPT)
    public.publicArea.unique.rsa = TPM2B_PUBLIC_KEY_RSA(key.public_key().public_numbers().n.to_bytes(256, "big"))
    wrapped = evidence.wrapSecret(public.marshal(), b"k" * 32)
    assert key.decrypt(wrapped, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(),
                                             evidence.WRAP_LABEL)) == b"k" * 32
    assert "1 to 190 bytes" in refused("format", evidence.wrapSecret, public.marshal(), b"k" * 191)
    assert "1 to 190 bytes" in refused("format", evidence.wrapSecret, public.marshal(), b"")


def test_the_activation_answer_must_be_the_secret():
    evidence.checkActivation(b"s" * 32, b"s" * 32)
    for answer in (b"t" * 32, b"s" * 31, "s" * 32, b"s" * (MAX_EVIDENCE * 2)):
        assert "not in the same TPM" in refused("key", evidence.checkActivation, b"s" * 32, answer)


def test_the_kernel_kind_is_what_the_firmware_starts():
    assert eventlog.bootKind(EV_EFI_BOOT_SERVICES_APPLICATION) == "kernel"
    assert eventlog.bootKind(0xD) == "kernel"
    assert eventlog.bootKind(0x4) == "separator"
    assert eventlog.bootKind(0x80000001) == eventlog.bootKind(0x8) == "firmware"


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=70),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                         st.sampled_from(list(evidence.POLICY_KINDS) + ["allow_any_firmware", "x"]),
                         inner, max_size=5), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_a_policy_file_is_read_or_refused_with_a_reason(document):
    try:
        policy = Policy.fromJSON(json.dumps(document))
    except EvidenceError as e:
        assert e.kind == "format"
    else:
        assert Policy.fromJSON(policy.toJSON()) == policy


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.binary(max_size=400))
def test_enrolment_of_noise_is_refused_with_a_reason(certificate, public):
    ak = sharedAK()
    for args in ((certificate, public, ak.public), (certificate, ak.public, public)):
        try:
            evidence.verifyEnrolment(*args, [])
        except EvidenceError as e:
            assert e.kind in ("format", "endorsement", "key")
        else:
            pytest.fail("noise enrolled")
