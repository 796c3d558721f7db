"""
How an encrypted image's key goes from the seller's TPM to its VM host
(L{TrustedSeller.imageKey}), on a task.Clock: the market releases the key
before it starts the VM, or (a slow or hostile market) never; keys wait a
bounded time and number; the TPM's refusals reach the market by name.
"""

import pytest
from twisted.internet import defer, task

from cpushare.client.seller import trusted
from cpushare.client.seller.trusted import MAX_BINDINGS, NoImageKey, TrustedSeller
from cpushare.protocol.commands import BadRequest

from test import fakeattest

KEY = b"k" * 32
TIMEOUT = 60.0


class VM:
    def __init__(self, id):
        self.id = id


class TPM:
    """A TPM service whose unwrap gives C{KEY} for a binding it made, as the real one."""

    def __init__(self):
        self.made = []

    def bindingKey(self, nonce, pcrs):
        binding = {"public": b"public %d" % len(self.made), "certify": b"c", "signature": b"s"}
        self.made.append(binding)
        return defer.succeed(binding)

    def unwrap(self, binding, wrapped):
        if binding not in self.made:
            return defer.fail(fakeattest.EvidenceError("key", "this TPM made no such binding key"))
        if wrapped != b"wrapped":
            return defer.fail(fakeattest.EvidenceError(
                "key", "the TPM refuses to unwrap the secret: its PCRs are no longer in the"
                       " attested state"))
        return defer.succeed(KEY)


PCRS = '{"0": "%s"}' % ("00" * 32)


def seller():
    clock = task.Clock()
    return clock, TrustedSeller(clock, TPM(), "/nonexistent", "/bin/true", keyTimeout=TIMEOUT)


def release(s, vm, wrapped=b"wrapped"):
    d = defer.ensureDeferred(s.bindingKey(vm, b"n" * 16, PCRS))
    d.addCallback(lambda _: defer.ensureDeferred(s.releaseKey(vm, wrapped)))
    return d


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_a_key_released_before_the_vm_starts_is_handed_to_it_once():
    clock, s = seller()
    result(release(s, 5))
    assert s.busy(), "a key waiting for its VM keeps the PCR state"
    assert result(s.imageKey(VM(5))) == KEY
    # Handed over, it is kept no more: a second start of VM 5 waits for a new release.
    waiting = s.imageKey(VM(5))
    assert not waiting.called
    clock.advance(TIMEOUT)
    assert isinstance(result(waiting).value, NoImageKey)


def test_a_vm_that_asks_first_gets_the_key_when_it_comes():
    clock, s = seller()
    d = s.imageKey(VM(6))
    clock.advance(TIMEOUT / 2)
    assert not d.called
    result(release(s, 6))
    assert result(d) == KEY
    clock.advance(TIMEOUT)          # its timeout was cancelled
    assert s.waiting == {} and s.released == {}


def test_a_key_that_never_comes_fails_the_vm_with_the_reason():
    clock, s = seller()
    d = s.imageKey(VM(7))
    clock.advance(TIMEOUT)
    failure = result(d)
    assert failure.check(NoImageKey)
    assert str(failure.value) == (
        "the market released no key for VM 7's encrypted image within 60s (its seller's TPM"
        " was not attested for it)")
    assert not s.busy()


def test_released_keys_wait_a_bounded_time_and_number():
    clock, s = seller()
    for vm in range(MAX_BINDINGS + 10):
        result(release(s, vm))
    assert len(s.released) == MAX_BINDINGS
    assert 0 not in s.released and MAX_BINDINGS + 9 in s.released
    clock.advance(TIMEOUT)
    assert s.released == {}, "an unclaimed key is dropped from memory"
    assert not clock.getDelayedCalls()


def test_a_vm_can_wait_for_its_key_only_once():
    clock, s = seller()
    s.imageKey(VM(8))
    assert result(s.imageKey(VM(8))).check(NoImageKey)


def test_a_release_without_a_binding_or_in_another_state_is_refused_by_name():
    clock, s = seller()
    with pytest.raises(BadRequest, match="no binding key was made for VM 9"):
        result(defer.ensureDeferred(s.releaseKey(9, b"wrapped"))).raiseException()

    class Session:
        trusted = s

    d = trusted.responder(Session, "releaseKey", 11, b"x")
    failure = result(d)
    assert failure.check(BadRequest) and "no binding key was made for VM 11" in str(failure.value)
    result(defer.ensureDeferred(s.bindingKey(12, b"n" * 16, PCRS)))
    failure = result(trusted.responder(Session, "releaseKey", 12, b"other"))
    # The TPM's own refusal reaches the market as a BadRequest with its reason.
    assert failure.check(BadRequest)
    assert "its PCRs are no longer in the attested state" in str(failure.value)
    assert 12 not in s.released


def test_the_seller_takes_a_boot_event_log_only_with_a_tpm_and_wires_the_image_keys(
        monkeypatch, tmp_path):
    from twisted.python import usage
    from twisted.internet.testing import MemoryReactorClock
    from cpushare.client.home import Home
    from cpushare.client.options import ClientOptions
    from cpushare.client.seller import service

    def noAccount(self):
        self.home = Home(str(tmp_path))
        self.host, self.port = "market.example", 8443

    monkeypatch.setattr(ClientOptions, "postOptions", noAccount)
    with pytest.raises(usage.UsageError, match="--tpm-event-log is the log of a TPM's boot"
                                               " chain: give --tpm too"):
        service.Options().parseOptions(["--tpm-event-log", "/boot.log"])
    options = service.Options()
    options.parseOptions(["--tpm", "swtpm:host=127.0.0.1,port=1", "--tpm-event-log",
                          "/boot.log", "--accel", "tcg", "--cache", str(tmp_path / "images")])
    opened = []

    def openTPM(reactor, spec, home, eventLog=None):
        from twisted.application.service import Service
        tpm = Service()
        opened.append((spec, home, eventLog))
        return tpm

    monkeypatch.setattr(trusted, "openTPM", openTPM)
    seller = service.makeService(options, MemoryReactorClock())
    assert opened == [("swtpm:host=127.0.0.1,port=1", str(tmp_path), "/boot.log")]
    # The VM host asks the seller's TrustedSeller for each encrypted image's key,
    # and the TPM service stops with the program.
    assert seller.host.imageKey.__self__.__class__ is TrustedSeller
    assert len(list(seller)) == 3
