"""
Trusted computing on the market: sellers' TPMs enrolled, quotes asked
and checked, trusted leases admitted, watched and stopped.

The one module of the market that calls the TPM evidence library
(L{cpushare.attest.evidence}, pure functions run on the reactor's thread
pool: they are CPU work); tests give L{Attestations} a stand-in.

Enrolment (a seller started with --tpm, on each connection): EnrolTPM
brings the endorsement key's certificate, which must chain to a CA the
operator installed (--tpm-ca; a test CA only with --tpm-test-ca), and the
attestation key (AK); the market answers with a challenge made to the
endorsement key for the AK (MakeCredential) and the seller proves, with
ActivateTPM, that both keys live in one TPM.  The AK is then bound to the
seller's account and to the client certificate of that connection: another
account or certificate offering it is refused.  An AK already bound to the
same account and certificate skips the challenge.

Attestation: the market sends Attest with a fresh nonce (NONCE_SIZE random
bytes, asked once; a quote answers only the nonce it was asked with) and
checks the quote against the operator's policy (`cpushare-admin
tpm-policy`, read from the database at each check, so the running market
follows it).  A seller is attested once enrolled, then every C{every}
seconds; a trusted lease before its VM starts (the quote must measure the
lease's image) and every C{every} seconds while it runs.  It fails closed:
a refused quote, or no answer in C{timeout} seconds, stops the lease with
the reason, and its bills never go past its last good quote
(L{cpushare.server.money.billing.bill}).  Each refusal is logged with its
reason and kept as the seller's last result, which `sellers --explain`
shows ("not attested: REASON") and which keeps trusted orders off it.

Encrypted images: after a lease's quote passed, L{releaseImageKey} asks
the seller for a key its TPM can use only in the PCR state just quoted
(certified by the AK over a new nonce), checks it, wraps the image's key
to it and sends it (ReleaseKey).  The image keys are the image store's
(C{imagekeys.unsealed(account, sha256)}: bytes, or None for an image that
is not encrypted).
"""

import hashlib
import json
import os
import weakref

import attr
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from cpushare.protocol import commands
from cpushare.protocol.commands import NotPermitted
from cpushare.server.db import leases as leasesql
from cpushare.server.db import tpmsql

DEFAULT_EVERY = 300.0
# Seconds a seller has to answer an Attest (or BindingKey, ReleaseKey).
ANSWER_TIMEOUT = 60.0
# The most the operator's trusted commission may take of a charge, in
# millionths (as the funds commission): 50%.
MAX_COMMISSION = 500_000
NONCE_SIZE = commands.NONCE_SIZE
NOT_ENROLLED = "has no TPM enrolled (cpushare-seller --tpm)"
MAX_PCRS = 32
# EnrolTPM commands one connection may send (each costs the market CPU).
MAX_ENROLMENTS = 3


class Refused(Exception):
    """Evidence the market refuses: the reason, for the log and --explain."""


@attr.s
class Trust:
    """A seller session's TPM: its enrolled key and how its last attestation went."""

    akName = attr.ib()              # hex
    akPublic = attr.ib()            # bytes
    attested = attr.ib(default=None)    # when its last quote passed, or None
    untrusted = attr.ib(default="not attested yet")     # why it is not trusted, or None
    call = attr.ib(default=None)    # the next attestation of the seller


@attr.s
class Challenge:
    """An enrolment challenge open on a connection: answered once."""

    secret = attr.ib()
    akName = attr.ib()
    akPublic = attr.ib()
    ekFingerprint = attr.ib()
    ekIssuer = attr.ib()


def endorsementIssuer(ekCert):
    """The issuer of an endorsement certificate (DER), as text, for the operator."""
    try:
        from cryptography import x509
        return x509.load_der_x509_certificate(ekCert).issuer.rfc4514_string()[:200]
    except Exception:
        return "unknown"


def checkCommission(rate):
    """The operator's trusted commission (millionths of a charge), checked."""
    if isinstance(rate, bool) or not isinstance(rate, int) or not 0 <= rate <= MAX_COMMISSION:
        raise ValueError(f"the trusted commission is 0 to {MAX_COMMISSION // 10_000} percent")
    return rate


def clockOf(attested):
    """
    (resetCount, clock) of a quote's TPM clock information, or None when
    the library gives none.
    """
    info = getattr(attested, "clock", None)
    if info is None:
        return None
    get = info.get if isinstance(info, dict) else lambda name: getattr(info, name, None)
    reset, clock = get("resetCount"), get("clock")
    if not isinstance(reset, int) or not isinstance(clock, int):
        return None
    return reset, clock


def decodeQuote(answer):
    """An Attest answer as the quote dict of verifyQuote; L{Refused} when malformed."""
    try:
        pcrs = json.loads(answer["pcrs"])
        events = json.loads(answer["events"])
        if not isinstance(pcrs, dict) or not isinstance(events, list) or len(pcrs) > MAX_PCRS:
            raise ValueError("not an object and a list")
        pcrs = {int(k): bytes.fromhex(v) for k, v in pcrs.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise Refused(f"the quote's PCR values or event log are malformed ({e})") from None
    return {"attest": answer["attest"], "signature": answer["signature"], "pcrs": pcrs,
            "events": events}


def checkQuote(evidence, akPublic, quote, nonce, policy):
    """
    The library's verifyQuote of C{quote} against the operator's C{policy}
    as the database keeps it (L{tpmsql.policy}: JSON-able data, read by the
    library's C{Policy.fromJSON}, which refuses a malformed one by name).
    """
    return evidence.verifyQuote(akPublic, quote, nonce,
                                evidence.Policy.fromJSON(json.dumps(policy)))


class Attestations:
    """
    The sellers' TPMs and the trusted leases; see the module.  C{orders}
    (set by the market) is told when a lease's attestation fails
    (C{attestationFailed}) and when trust changes capacity
    (C{capacityChanged}); C{board.invalidate} re-ranks sellers.
    """

    log = Logger()

    def __init__(self, reactor, store, board, cas=(), every=DEFAULT_EVERY,
                 timeout=ANSWER_TIMEOUT, commission=0, library=None, imagekeys=None):
        """
        @param cas: the TPM vendor CAs the operator trusts (x509
            certificates); none: the market takes no enrolment.
        @param commission: the operator's trusted commission, in millionths
            of each charge of a trusted lease.
        @param library: the evidence library (L{cpushare.attest}: an object
            with C{evidence} and C{EvidenceError}); None: imported when first used.
        @param imagekeys: the keys of encrypted images (C{unsealed(account,
            sha256)}), or None.
        """
        self.reactor = reactor
        self.store = store
        self.board = board
        self.cas = list(cas)
        self.every = float(every)
        self.timeout = float(timeout)
        self.commissionPpm = checkCommission(commission)
        self._library = library
        self.imagekeys = imagekeys
        self.orders = None
        self.random = os.urandom
        self._calls = {}            # lease id -> its next attestation
        self._clocks = {}           # lease id -> its last quote's L{clockOf}
        # seller session -> the lock its trusted leases' admissions take turns on
        self._admissions = weakref.WeakKeyDictionary()

    # -- the library, behind one seam

    @property
    def library(self):
        if self._library is None:
            import cpushare.attest
            import cpushare.attest.evidence  # noqa: F401 (a submodule, as an attribute)
            self._library = cpushare.attest
        return self._library

    def _cpu(self, fn, *args):
        """C{fn(*args)} of the evidence library on the thread pool; L{Refused} for its refusals."""
        library = self.library
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

        def refused(failure):
            failure.trap(library.EvidenceError)
            raise Refused(str(failure.value))

        return d.addErrback(refused)

    def _nonce(self):
        return self.random(NONCE_SIZE)

    def stop(self):
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        self._clocks.clear()

    # -- enrolment

    async def enrol(self, session, ekCert, ekPublic, akPublic):
        """EnrolTPM from C{session}'s seller: its answer (see L{commands.EnrolTPM})."""
        if not self.cas:
            raise NotPermitted("this market enrols no TPM: its operator trusts no TPM vendor"
                               " CA (the server's --tpm-ca)")
        session.tpmEnrolments = getattr(session, "tpmEnrolments", 0) + 1
        if session.tpmEnrolments > MAX_ENROLMENTS:
            raise NotPermitted(f"at most {MAX_ENROLMENTS} TPM enrolments a connection:"
                               " connect again")
        evidence = self.library.evidence
        try:
            akName = await self._cpu(evidence.verifyEnrolment, ekCert, ekPublic, akPublic,
                                     self.cas)
        except Refused as e:
            self._refusedEnrolment(session, str(e))
        akHex = akName.hex()
        known = await self.store.run(tpmsql.keyOf, akHex)
        if known is not None:
            why = tpmsql.ownerProblem(known, session.account.id, session.certificate)
            if why is not None:
                self._refusedEnrolment(session, why)
            self._trusted(session, akHex, akPublic)
            return {"enrolled": True}
        challenge, secret = await self._cpu(evidence.makeChallenge, ekPublic, akName)
        session.tpmChallenge = Challenge(secret, akHex, akPublic,
                                         hashlib.sha256(ekCert).hexdigest(),
                                         endorsementIssuer(ekCert))
        return {"enrolled": False, "credential_blob": challenge["credential_blob"],
                "encrypted_secret": challenge["encrypted_secret"]}

    async def activate(self, session, secret):
        """ActivateTPM: the answer to the open challenge; right, the AK is bound."""
        challenge = getattr(session, "tpmChallenge", None)
        session.tpmChallenge = None
        if challenge is None:
            raise NotPermitted("no TPM enrolment challenge is open on this connection (each is"
                               " answered once): send EnrolTPM again")
        try:
            await self._cpu(self.library.evidence.checkActivation, challenge.secret, secret)
        except Refused as e:
            self._refusedEnrolment(session, f"the enrolment challenge was answered wrong: {e}")
        why = await self.store.run(
            tpmsql.enrol, challenge.akName, session.account.id, session.certificate,
            challenge.ekFingerprint, challenge.ekIssuer, challenge.akPublic.hex())
        if why is not None:
            self._refusedEnrolment(session, why)
        self.log.info("seller {name} enrolled its TPM (attestation key {ak}, endorsement"
                      " certificate by {issuer})", name=session.account.name,
                      ak=challenge.akName[:16], issuer=challenge.ekIssuer)
        self._trusted(session, challenge.akName, challenge.akPublic)

    def _refusedEnrolment(self, session, why):
        self.log.warn("refused the TPM enrolment of seller {name}: {why}",
                      name=session.account.name, why=why)
        # What `sellers --explain --trusted` says of it, until it enrols.
        session.tpmRefused = f"TPM enrolment refused: {why}"
        self.board.invalidate()
        raise NotPermitted(f"TPM enrolment refused: {why}")

    def _trusted(self, session, akName, akPublic):
        """C{session}'s seller has the enrolled key C{akName}: attest it now."""
        old = getattr(session, "trust", None)
        if old is not None and old.call is not None and old.call.active():
            old.call.cancel()
        session.trust = Trust(akName, akPublic)
        session.trust.call = self.reactor.callLater(0, self._attestSeller, session)

    # -- attesting

    def _attestSeller(self, session):
        trust = getattr(session, "trust", None)
        if trust is None or not session.connected:
            return
        trust.call = None

        def again(_):
            if session.connected and session.trust is trust:
                trust.call = self.reactor.callLater(self.every, self._attestSeller, session)

        d = defer.ensureDeferred(self.attest(session))
        d.addErrback(lambda f: self.log.failure("attesting seller {name}", f,
                                                name=session.account.name))
        d.addCallback(again)

    async def attest(self, session, vm=None):
        """
        Ask C{session}'s seller for a quote (for C{vm}, measuring its image,
        when given) and check it: the L{Attested}, or None when refused
        (logged, kept as the seller's last result, which then keeps
        trusted orders off it).
        """
        trust = session.trust
        nonce = self._nonce()
        try:
            kw = {} if vm is None else {"vm": vm.id, "image": vm.image}
            answer = await self._ask(session, commands.Attest, nonce=nonce, **kw)
            quote = decodeQuote(answer)
            policy = await self.store.run(tpmsql.policy)
            attested = await self._cpu(checkQuote, self.library.evidence, trust.akPublic,
                                       quote, nonce, policy)
            if vm is not None:
                if vm.image not in set(getattr(attested, "images", ()) or ()):
                    raise Refused(f"the quote does not measure this lease's image"
                                  f" {vm.image[:16]}...")
                self._checkClock(vm.leaseId, attested)
        except Refused as e:
            await self._result(session, trust, None, f"not attested: {e}", vm)
            return None
        await self._result(session, trust, self.reactor.seconds(), None, vm)
        return attested

    def _checkClock(self, leaseId, attested):
        """
        A lease's quotes come from one boot of its seller's TPM, its clock
        going forward: L{Refused} when the TPM was reset or its clock went back.
        """
        now = clockOf(attested)
        if now is None or leaseId is None:
            return
        before = self._clocks.get(leaseId)
        if before is not None:
            if now[0] != before[0]:
                raise Refused("the TPM was reset since the lease's last quote (its computer"
                              " restarted under the VM)")
            if now[1] < before[1]:
                raise Refused("the TPM's clock went back since the lease's last quote (an old"
                              " quote)")
        self._clocks[leaseId] = now

    async def _result(self, session, trust, when, why, vm):
        changed = (trust.untrusted is None) != (why is None)
        if why is None:
            trust.attested, trust.untrusted = when, None
        else:
            trust.untrusted = why
            self.log.warn("seller {name}{lease}: {why}", name=session.account.name,
                          lease="" if vm is None else f" (VM {vm.id})", why=why)
        await self.store.run(tpmsql.recordResult, trust.akName, when, why or "passed")
        if changed:
            self.board.invalidate()
            if why is None and self.orders is not None:
                self.orders.capacityChanged()

    def _ask(self, session, command, **kw):
        """
        C{command} to C{session}'s seller; fails with L{Refused} when it
        refuses or gives no answer in C{timeout} seconds (a later answer is
        ignored).
        """
        d = defer.Deferred()
        name = command.__name__

        def late():
            d.errback(Refused(f"the seller did not answer {name} within {self.timeout:g}s"))

        call = self.reactor.callLater(self.timeout, late)

        def answered(result):
            if call.active():
                call.cancel()
                d.callback(result)
            else:
                self.log.info("ignored seller {name}'s late answer to {command}",
                              name=session.account.name, command=name)

        def failed(failure):
            if call.active():
                call.cancel()
                d.errback(Refused(f"the seller refused {name}: {failure.getErrorMessage()}"))

        if not session.connected:
            call.cancel()
            return defer.fail(Refused("the seller is not connected"))
        session.control.callRemote(command, **kw).addCallbacks(answered, failed)
        return d

    # -- trusted leases

    async def admit(self, vm, seller, leaseId):
        """
        Before trusted lease C{leaseId} of C{vm} starts on C{seller}: its
        quote, then (for an encrypted image) its image's key.  None when it
        may start, else why not.
        """
        if getattr(seller, "trust", None) is None:
            return NOT_ENROLLED
        # One admission at a time on a seller: another lease's image measured
        # between this quote and its key's release would change PCR 23, and
        # the key, bound to the quoted PCRs, could not be unwrapped.
        lock = self._admissions.setdefault(seller, defer.DeferredLock())
        await lock.acquire()
        try:
            attested = await self.attest(seller, vm)
            if attested is None:
                return seller.trust.untrusted
            await self.store.run(leasesql.setAttested, leaseId, self.reactor.seconds())
            try:
                await self.releaseImageKey(vm, seller, attested)
            except Refused as e:
                why = f"not attested: its image's key was not released: {e}"
                await self._result(seller, seller.trust, None, why, vm)
                return why
        finally:
            lock.release()
        self._calls[leaseId] = self.reactor.callLater(
            self.every, self._reattest, vm, seller, leaseId)
        return None

    def resume(self, vm, seller, leaseId):
        """
        Trusted lease C{leaseId} of C{vm} runs on again on C{seller} (a new
        connection, or after a restart): attested again once the seller had
        C{timeout} seconds to enrol, then every C{every} seconds.
        """
        old = self._calls.pop(leaseId, None)
        if old is not None and old.active():
            old.cancel()
        self._calls[leaseId] = self.reactor.callLater(
            min(self.every, self.timeout), self._reattest, vm, seller, leaseId)

    def _reattest(self, vm, seller, leaseId):
        self._calls.pop(leaseId, None)
        if vm.leaseId != leaseId or not vm.active:
            self._clocks.pop(leaseId, None)
            return
        if vm.seller is not seller:
            return
        d = defer.ensureDeferred(self._again(vm, seller, leaseId))
        d.addErrback(lambda f: self.log.failure("attesting VM {vm}", f, vm=vm.id))

    async def _again(self, vm, seller, leaseId):
        trust = getattr(seller, "trust", None) if seller.connected else None
        attested = None if trust is None else await self.attest(seller, vm)
        if vm.leaseId != leaseId or not vm.active:
            return
        if attested is None:
            why = trust.untrusted if trust is not None else \
                "not attested: its seller's TPM is not enrolled on its connection"
            self._clocks.pop(leaseId, None)
            self.orders.attestationFailed(vm, why)
            return
        await self.store.run(leasesql.setAttested, leaseId, self.reactor.seconds())
        self._calls[leaseId] = self.reactor.callLater(
            self.every, self._reattest, vm, seller, leaseId)

    async def releaseImageKey(self, vm, seller, attested):
        """
        After C{vm}'s quote passed (C{attested}): when its image is
        encrypted, its key wrapped to a TPM key usable only in the quoted
        PCR state, sent to the seller.  L{Refused} when that fails.
        """
        if self.imagekeys is None:
            return
        key = await defer.maybeDeferred(self.imagekeys.unsealed, vm.buyerId, vm.image)
        if key is None:
            return
        evidence = self.library.evidence
        nonce = self._nonce()
        pcrs = dict(attested.pcrs)
        answer = await self._ask(seller, commands.BindingKey, vm=vm.id, nonce=nonce,
                                 pcrs=json.dumps({str(k): v.hex() for k, v in
                                                  sorted(pcrs.items())}).encode())
        binding = {"public": answer["public"], "certify": answer["certify"],
                   "signature": answer["signature"]}
        keyPublic = await self._cpu(evidence.verifyBindingKey, seller.trust.akPublic, binding,
                                    nonce, pcrs)
        wrapped = await self._cpu(evidence.wrapSecret, keyPublic, key)
        await self._ask(seller, commands.ReleaseKey, vm=vm.id, wrapped=wrapped)
        self.log.info("released the image key of VM {vm} to seller {name}", vm=vm.id,
                      name=seller.account.name)

    # -- what the operator and the buyers see

    def enrolled(self):
        """The enrolled keys (for cpushare-admin and the operator's pages)."""
        return self.store.run(tpmsql.enrolled)
