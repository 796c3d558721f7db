"""
Trusted computing on the market in memory (test/fakemarket.py): sellers'
TPMs enrolled and attested, trusted orders, and what a cheating seller or
an impostor would try.  The TPM and its evidence library are the stand-in
of test/fakeattest.py; the real library is tested against swtpm.
"""

import json
import pytest
import re
import os

from twisted.internet import defer

from cpushare.client.seller.trusted import TrustedSeller, packageDigest
from cpushare.money import cost
from cpushare.protocol import commands
from cpushare.money import MICRO
from cpushare.server import admin
from cpushare.server.db import tpmsql
from cpushare.server.site import api
from cpushare.server.money import ledger

from test import fakeattest
from test.unit.test_billing import market  # noqa: F401 (a fixture)
from test.unit.test_orders import FakeProgram, FakeSellerControl, OrderCase

EVERY = 100.0
TIMEOUT = 30.0
CLIENT = packageDigest()


class FakeTPMService:
    """L{fakeattest.FakeTPM} behind the Deferreds of cpushare.attest.tpm.TPMService."""

    def __init__(self, tpm):
        self.tpm = tpm
        self.resets = 0

    def endorsement(self):
        return defer.succeed((self.tpm.ekCert, self.tpm.ekPublic))

    def attestationKey(self):
        return defer.succeed(self.tpm.akPublic)

    def activate(self, challenge):
        return defer.maybeDeferred(self.tpm.activate, challenge)

    def measure(self, kind, digest, what):
        return defer.succeed(self.tpm.measure(kind, digest, what))

    def resetClientPCR(self):
        self.resets += 1
        self.tpm.events = []
        return defer.succeed(None)

    def quote(self, nonce):
        return defer.succeed(self.tpm.quote(nonce))

    def bindingKey(self, nonce, pcrs):
        return defer.succeed(self.tpm.bindingKey(nonce, pcrs))

    def unwrap(self, binding, wrapped):
        return defer.maybeDeferred(self.tpm.unwrap, binding, wrapped)


class TrustedControl(FakeSellerControl):
    """A seller's Attest, BindingKey and ReleaseKey, with C{session.tamper} to cheat."""

    @commands.Attest.responder
    def attest(self, nonce, vm=None, image=None):
        session = self.session
        d = defer.ensureDeferred(session.trusted.attest(nonce, vm, image))
        session.asked.append((vm, nonce))

        def tampered(answer):
            session.answers.append(answer)
            return session.tamper(answer, vm) if session.tamper else answer

        return d.addCallback(tampered)

    @commands.BindingKey.responder
    def bindingKey(self, vm, nonce, pcrs):
        return defer.ensureDeferred(self.session.trusted.bindingKey(vm, nonce, pcrs))

    @commands.ReleaseKey.responder
    def releaseKey(self, vm, wrapped):
        d = defer.ensureDeferred(self.session.trusted.releaseKey(vm, wrapped))
        return d.addCallback(lambda _: {})


class TrustedProgram(FakeProgram):
    controlClass = TrustedControl

    def __init__(self, *a, **kw):
        FakeProgram.__init__(self, *a, **kw)
        self.trusted = None
        self.tamper = None
        self.asked = []
        self.answers = []
        self.keys = {}


class ImageKeys:
    """A stand-in of the image store's keys of encrypted images."""

    def __init__(self):
        self.keys = {}

    def unsealed(self, account, sha256):
        return self.keys.get((account, sha256))


ATTESTATIONS = {"cas": [b"vendor-ca"], "library": fakeattest, "every": EVERY,
                "timeout": TIMEOUT, "commission": 100_000}


class TrustedSellers:
    """A market that enrols the stand-in TPMs, with a policy that lets them pass."""

    def makeMarket(self, **kw):
        self.imagekeys = ImageKeys()
        super().makeMarket(attestations=dict(ATTESTATIONS, imagekeys=self.imagekeys), **kw)

    async def allowHonestSellers(self):
        self.qemu = os.path.join(self.folder, "qemu-system-x86_64")
        with open(self.qemu, "wb") as f:
            f.write(b"\x7fELF a QEMU")
        from cpushare.client.seller.trusted import fileDigest
        self.qemuDigest = fileDigest(self.qemu)
        for kind, digest in (("firmware", "f" * 64), ("kernel", "e" * 64),
                             ("qemu", self.qemuDigest), ("client", CLIENT)):
            await self.store.run(tpmsql.allow, kind, digest)

    async def trustedSeller(self, who, tpm=None, price=10_000, trusted_price=15_000, cores=2,
                            enrol=True):
        """A seller program of C{who} with a TPM, enrolled and attested (with C{enrol})."""
        session = await self.connect("seller", *who, sessionClass=TrustedProgram)
        session.tpm = tpm or fakeattest.FakeTPM(b"vendor-ca")
        session.trusted = TrustedSeller(self.reactor, FakeTPMService(session.tpm), self.folder,
                                        self.qemu, running=lambda: 1,
                                        onImageKey=session.keys.__setitem__)
        await session.control.callRemote(commands.Offer, cores=cores, memory=4096, price=price,
                                         trusted_price=trusted_price)
        if enrol:
            await defer.ensureDeferred(session.trusted.enrol(session))
            await self.sleep(0.1)
        return session


class TrustedCase(TrustedSellers, OrderCase):

    @defer.inlineCallbacks
    def setUp(self):
        yield OrderCase.setUp(self)
        yield defer.ensureDeferred(self.allowHonestSellers())

    def trustedSeller(self, *a, **kw):
        return defer.ensureDeferred(TrustedSellers.trustedSeller(self, *a, **kw))

    def order(self, vms=1, **kw):
        return self.call(self.cli, commands.PlaceOrder, image=self.sha, vms=vms, cores=1,
                         memory=256, **kw)

    def sellers(self, **kw):
        return self.call(self.cli, commands.ListSellers, offset=0, explain=True, **kw)

    def lease(self, vmId):
        def read(cursor):
            cursor.execute("SELECT id, price, trusted, attested, started, live_since, ended,"
                           " charged, held, reason, settled FROM leases WHERE vm_id = ?"
                           " ORDER BY id", (vmId,))
            keys = ("id", "price", "trusted", "attested", "started", "live", "ended",
                    "charged", "held", "reason", "settled")
            return [dict(zip(keys, row)) for row in cursor.fetchall()]
        return self.store.run(read)

    def commission(self):
        def read(cursor):
            return ledger.balance(cursor, ledger.COMMISSION)
        return self.store.run(read)

    @defer.inlineCallbacks
    def running(self, seller, vmId, cpu=0.0):
        """The seller says VM C{vmId} runs, with C{cpu} CPU seconds."""
        yield self.call(seller, commands.VMState, vm=vmId, state="running", cpu_seconds=cpu)


class EnrolmentTests(TrustedCase):

    @defer.inlineCallbacks
    def test_an_honest_seller_enrols_once_and_is_attested(self):
        seller = yield self.trustedSeller(self.sam)
        [entry] = (yield self.sellers())["sellers"]
        self.assertEqual(entry["trusted_price"], 15_000)
        self.assertIsNotNone(entry["attested"])
        self.assertIsNone(entry["trust"])
        [key] = yield self.store.run(tpmsql.enrolled)
        self.assertEqual((key["account"], key["last_result"]), ("sam", "passed"))
        # It connects again with the same key: enrolled already, no challenge.
        yield self.close(seller)
        again = yield self.trustedSeller(self.sam, tpm=seller.tpm, enrol=False)
        answer = yield self.call(again, commands.EnrolTPM, ek_cert=seller.tpm.ekCert,
                                 ek_public=seller.tpm.ekPublic, ak_public=seller.tpm.akPublic)
        self.assertTrue(answer["enrolled"])
        self.assertIsNone(answer["credential_blob"])

    @defer.inlineCallbacks
    def test_an_endorsement_certificate_of_an_unknown_ca_is_refused(self):
        seller = yield self.trustedSeller(self.sam, fakeattest.FakeTPM(b"my-own-ca"),
                                          enrol=False)
        with self.assertRaises(commands.NotPermitted) as e:
            yield defer.ensureDeferred(seller.trusted.enrol(seller))
        self.assertIn("not signed by a CA the operator trusts", str(e.exception))
        [entry] = (yield self.sellers(trusted=True))["sellers"]
        # --explain names why it has no TPM enrolled: the refusal itself.
        self.assertEqual(entry["excluded"], "TPM enrolment refused: the endorsement certificate"
                                            " is not signed by a CA the operator trusts")

    @defer.inlineCallbacks
    def test_a_challenge_answered_wrong_is_refused_and_answered_only_once(self):
        seller = yield self.trustedSeller(self.sam, enrol=False)
        tpm = seller.tpm
        answer = yield self.call(seller, commands.EnrolTPM, ek_cert=tpm.ekCert,
                                 ek_public=tpm.ekPublic, ak_public=tpm.akPublic)
        self.assertFalse(answer["enrolled"])
        with self.assertRaises(commands.NotPermitted) as e:
            yield self.call(seller, commands.ActivateTPM, secret=b"\0" * 32)
        self.assertIn("the enrolment challenge was answered wrong", str(e.exception))
        # The right answer, now, is too late: each challenge is answered once.
        with self.assertRaises(commands.NotPermitted) as e:
            yield self.call(seller, commands.ActivateTPM, secret=tpm.activate(answer))
        self.assertIn("no TPM enrolment challenge is open", str(e.exception))
        self.assertEqual((yield self.store.run(tpmsql.enrolled)), [])

    @defer.inlineCallbacks
    def test_an_attestation_key_of_one_account_is_refused_to_another(self):
        honest = yield self.trustedSeller(self.sam)
        thief = yield self.register("thief")
        # Another account presents the same TPM's keys (a copied key, or a relay).
        copy = yield self.trustedSeller(thief, tpm=honest.tpm, enrol=False)
        with self.assertRaises(commands.NotPermitted) as e:
            yield defer.ensureDeferred(copy.trusted.enrol(copy))
        self.assertIn("enrolled by another account", str(e.exception))
        # Even once it won a challenge of its own, before the honest one enrolled.
        other = fakeattest.FakeTPM(b"vendor-ca")
        thief2 = yield self.register("thief2")
        a = yield self.trustedSeller(self.alice, tpm=other, enrol=False)
        b = yield self.trustedSeller(thief2, tpm=other, enrol=False)
        ca = yield self.call(a, commands.EnrolTPM, ek_cert=other.ekCert,
                             ek_public=other.ekPublic, ak_public=other.akPublic)
        cb = yield self.call(b, commands.EnrolTPM, ek_cert=other.ekCert,
                             ek_public=other.ekPublic, ak_public=other.akPublic)
        yield self.call(a, commands.ActivateTPM, secret=other.activate(ca))
        with self.assertRaises(commands.NotPermitted) as e:
            yield self.call(b, commands.ActivateTPM, secret=other.activate(cb))
        self.assertIn("enrolled by another account", str(e.exception))

    @defer.inlineCallbacks
    def test_a_connection_enrols_a_few_times_at_most(self):
        seller = yield self.trustedSeller(self.sam, enrol=False)
        tpm = seller.tpm
        for _ in range(3):
            yield self.call(seller, commands.EnrolTPM, ek_cert=tpm.ekCert,
                            ek_public=tpm.ekPublic, ak_public=tpm.akPublic)
        with self.assertRaises(commands.NotPermitted) as e:
            yield self.call(seller, commands.EnrolTPM, ek_cert=tpm.ekCert,
                            ek_public=tpm.ekPublic, ak_public=tpm.akPublic)
        self.assertIn("at most 3 TPM enrolments a connection", str(e.exception))

    @defer.inlineCallbacks
    def test_a_buyer_or_command_line_cannot_enrol(self):
        tpm = fakeattest.FakeTPM(b"vendor-ca")
        with self.assertRaises(commands.BadRequest) as e:
            yield self.call(self.cli, commands.EnrolTPM, ek_cert=tpm.ekCert,
                            ek_public=tpm.ekPublic, ak_public=tpm.akPublic)
        self.assertIn("only a seller connection", str(e.exception))

    @defer.inlineCallbacks
    def test_oversized_evidence_is_refused_naming_the_field(self):
        seller = yield self.trustedSeller(self.sam, enrol=False)
        with self.assertRaises(commands.BadRequest) as e:
            yield self.call(seller, commands.EnrolTPM, ek_cert=b"x" * 60001,
                            ek_public=b"k", ak_public=b"a")
        self.assertIn("ek_cert: longer than 60000 bytes", str(e.exception))


class TrustedOrderTests(TrustedCase):

    @defer.inlineCallbacks
    def test_a_trusted_order_never_lands_on_an_unenrolled_or_failed_seller(self):
        plain = yield self.connect("seller", *self.sam, sessionClass=FakeProgram)
        yield self.call(plain, commands.Offer, cores=4, memory=4096, price=1_000)
        # A seller whose QEMU the operator's policy does not allow.
        crook = yield self.register("crook")
        failing = yield self.trustedSeller(crook, enrol=False)
        with open(self.qemu, "ab") as f:
            f.write(b" patched")
        failing.trusted._digests = None
        yield defer.ensureDeferred(failing.trusted.enrol(failing))
        yield self.sleep(0.1)
        placed = yield self.order(vms=1, trusted=True, explain=True)
        self.assertEqual(placed["allocated"], 0)
        self.assertIn("2 by --trusted", placed["waiting"])
        listed = yield self.sellers(trusted=True)
        reasons = {e["name"]: e["excluded"] for e in listed["sellers"]}
        self.assertEqual(reasons["sam"], "has no TPM enrolled (cpushare-seller --tpm)")
        self.assertRegex(reasons["crook"],
                         r"^not attested: QEMU's digest [0-9a-f]{16}\.\.\. is not allowed by"
                         r" the operator's policy$")
        [key] = yield self.store.run(tpmsql.enrolled)
        self.assertEqual(key["last_result"], reasons["crook"])
        yield self.sleep(1)
        self.assertEqual((len(plain.started.pending), len(failing.started.pending)), (0, 0))
        # An untrusted order goes to the cheap seller as before.
        placed = yield self.order(vms=1)
        self.assertEqual(placed["allocated"], 1)
        yield self.within(plain.started.get())

    @defer.inlineCallbacks
    def test_a_trusted_lease_is_billed_at_the_trusted_price_with_the_commission(self):
        plain = yield self.connect("seller", *self.sam, sessionClass=FakeProgram)
        yield self.call(plain, commands.Offer, cores=4, memory=4096, price=1_000)
        tina = yield self.register("tina")
        seller = yield self.trustedSeller(tina, price=10_000, trusted_price=36_000)
        dry = yield self.order(vms=1, trusted=True, dry_run=True)
        self.assertEqual([p["seller"] for p in dry["plan"]], ["tina"])
        self.assertEqual(dry["plan"][0]["price"], 36_000)
        self.assertEqual(dry["premium"], 26_000)
        placed = yield self.order(vms=1, trusted=True)
        [vmId] = placed["vm_ids"]
        start = yield self.within(seller.started.get())
        self.assertEqual(start["vm"], vmId)
        # The VM started only after a quote that measured its image.
        [(vm, nonce)] = [a for a in seller.asked if a[0] is not None]
        self.assertEqual(vm, vmId)
        self.assertIn(self.sha, [e["digest"] for e in seller.tpm.events if e["kind"] == "image"])
        yield self.running(seller, vmId)
        yield self.showLife(seller, vmId)
        yield self.sleep(EVERY * 1.5)
        yield self.running(seller, vmId, cpu=10_000.0)
        yield self.sleep(EVERY)
        yield self.market.billing.tick()
        [lease] = yield self.lease(vmId)
        self.assertEqual((lease["price"], lease["trusted"]), (36_000, 1))
        # Billed up to its last good quote: 200 s of one core at the trusted price.
        paidFor = lease["attested"] - lease["live"]
        self.assertEqual(lease["charged"], cost(36_000, 0, paidFor, 0))
        commission = yield self.commission()
        self.assertEqual(commission, lease["charged"] // 10)
        earnings = (yield self.balances("tina"))["earnings"]
        self.assertEqual(earnings + commission, lease["charged"])
        yield self.checkBooks()
        # Its buyer sees what it pays; untrusted orders are unchanged.
        yield self.call(self.cli, commands.StopVM, vm=vmId)
        yield self.sleep(20)
        yield self.checkBooks()


class FailClosedTests(TrustedCase):

    @defer.inlineCallbacks
    def startTrusted(self):
        seller = yield self.trustedSeller(self.sam)
        placed = yield self.order(vms=1, trusted=True)
        [vmId] = placed["vm_ids"]
        yield self.within(seller.started.get())
        yield self.running(seller, vmId)
        yield self.showLife(seller, vmId)
        # One re-attestation passes while it runs.
        yield self.sleep(EVERY + 1)
        return seller, vmId

    @defer.inlineCallbacks
    def failsAndStopsCharging(self, seller, vmId, reason):
        """The next re-attestation fails with C{reason}: the lease stops, charged to its last quote."""
        yield self.running(seller, vmId, cpu=1e6)
        yield self.market.billing.tick()
        [before] = yield self.lease(vmId)
        self.assertIsNotNone(before["attested"])
        self.assertGreater(before["charged"], 0)
        stopped = yield self.within(seller.stopped.get(), EVERY + TIMEOUT + 5)
        self.assertEqual(stopped, vmId)
        yield self.running(seller, vmId, cpu=1e6)
        yield self.call(seller, commands.VMState, vm=vmId, state="stopped",
                        cpu_seconds=1e6, reason="stopped")
        yield self.sleep(20)
        [lease] = yield self.lease(vmId)
        self.assertRegex(lease["reason"], reason)
        self.assertEqual(lease["settled"], 1)
        self.assertEqual(lease["attested"], before["attested"])
        self.assertGreater(lease["ended"], lease["attested"])
        # Charged for the CPU time up to the last good quote, not one second more.
        paidFor = lease["attested"] - max(lease["started"], lease["live"])
        self.assertEqual(lease["charged"], cost(lease["price"], 0, paidFor, 0))
        self.assertEqual(lease["held"], 0)
        vms = (yield self.call(self.cli, commands.ListVMs, all=True))["vms"]
        self.assertRegex(vms[0]["reason"], reason)
        yield self.checkBooks()
        listed = yield self.sellers(trusted=True)
        self.assertRegex(listed["sellers"][0]["excluded"], reason)

    @defer.inlineCallbacks
    def test_a_replayed_quote_stops_the_lease_and_its_charges(self):
        seller, vmId = yield self.startTrusted()
        seller.tamper = lambda answer, vm: seller.answers[-2] if vm is not None else answer
        yield self.failsAndStopsCharging(
            seller, vmId, r"^not attested: the quote's nonce is not the one asked for \(a"
                          r" replayed quote\)$")

    @defer.inlineCallbacks
    def test_a_quote_made_for_another_lease_stops_the_lease(self):
        seller, vmId = yield self.startTrusted()
        # It answers with a fresh quote that does not measure this lease's image.
        other = fakeattest.FakeTPM(b"vendor-ca")
        other.akPublic = seller.tpm.akPublic
        other.events = [e for e in seller.tpm.events if e["kind"] != "image"]

        def another(answer, vm):
            if vm is None:
                return answer
            nonce = seller.asked[-1][1]
            from cpushare.client.seller.trusted import encodeQuote
            return encodeQuote(other.quote(nonce))

        seller.tamper = another
        yield self.failsAndStopsCharging(
            seller, vmId, r"^not attested: the quote does not measure this lease's image")

    @defer.inlineCallbacks
    def test_a_quote_from_another_tpm_stops_the_lease(self):
        seller, vmId = yield self.startTrusted()
        other = fakeattest.FakeTPM(b"vendor-ca")

        def stranger(answer, vm):
            from cpushare.client.seller.trusted import encodeQuote
            return encodeQuote(other.quote(seller.asked[-1][1]))

        seller.tamper = stranger
        yield self.failsAndStopsCharging(
            seller, vmId, r"^not attested: the quote is not signed by the enrolled attestation"
                          r" key$")

    @defer.inlineCallbacks
    def test_an_event_log_that_does_not_replay_stops_the_lease(self):
        seller, vmId = yield self.startTrusted()

        def hidden(answer, vm):
            events = json.loads(answer["events"])
            events = [e for e in events if e["kind"] != "qemu"]
            return dict(answer, events=json.dumps(events).encode())

        seller.tamper = hidden
        yield self.failsAndStopsCharging(
            seller, vmId, r"^not attested: the event log does not replay to the quoted PCR 23$")

    @defer.inlineCallbacks
    def test_a_tpm_reset_under_a_running_lease_stops_it(self):
        seller, vmId = yield self.startTrusted()
        seller.tpm.resetCount += 1
        yield self.failsAndStopsCharging(
            seller, vmId, r"^not attested: the TPM was reset since the lease's last quote")

    @defer.inlineCallbacks
    def test_a_tpm_clock_going_back_stops_the_lease(self):
        seller, vmId = yield self.startTrusted()
        seller.tpm.clock -= 100
        yield self.failsAndStopsCharging(
            seller, vmId, r"^not attested: the TPM's clock went back since the lease's last")

    @defer.inlineCallbacks
    def test_a_malformed_answer_stops_the_lease(self):
        seller, vmId = yield self.startTrusted()
        seller.tamper = lambda answer, vm: dict(answer, pcrs=b'{"23": "not hex"}')
        yield self.failsAndStopsCharging(
            seller, vmId, r"^not attested: the quote's PCR values or event log are malformed")

    @defer.inlineCallbacks
    def test_a_changed_client_mid_lease_stops_the_lease(self):
        seller, vmId = yield self.startTrusted()
        seller.tpm.measure("client", "c" * 64, "cpushare")
        yield self.failsAndStopsCharging(
            seller, vmId, r"^not attested: client's digest cccccccccccccccc\.\.\. is not allowed"
                          r" by the operator's policy$")

    @defer.inlineCallbacks
    def test_no_answer_in_time_stops_the_lease_and_a_late_answer_is_ignored(self):
        seller, vmId = yield self.startTrusted()

        def late(answer, vm):
            d = defer.Deferred()
            self.reactor.callLater(TIMEOUT + 10, d.callback, answer)
            return d

        seller.tamper = late
        yield self.failsAndStopsCharging(
            seller, vmId, r"^not attested: the seller did not answer Attest within 30s$")
        yield self.sleep(TIMEOUT)

    @defer.inlineCallbacks
    def test_the_operator_removing_a_digest_from_the_policy_stops_running_leases(self):
        seller, vmId = yield self.startTrusted()
        self.assertTrue((yield self.store.run(tpmsql.disallow, "qemu", self.qemuDigest)))
        yield self.failsAndStopsCharging(seller, vmId, r"^not attested: QEMU's digest")

    @defer.inlineCallbacks
    def test_a_seller_failing_before_the_start_is_not_used_and_the_vm_waits(self):
        seller = yield self.trustedSeller(self.sam)
        seller.tamper = lambda answer, vm: seller.answers[0] if vm is not None else answer
        placed = yield self.order(vms=1, trusted=True)
        [vmId] = placed["vm_ids"]
        yield self.sleep(1)
        self.assertEqual(len(seller.started.pending), 0)
        [vm] = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertEqual(vm["state"], "pending")
        self.assertIn("seller sam was not attested: the quote's nonce", vm["reason"])
        [lease] = yield self.lease(vmId)
        self.assertEqual((lease["charged"], lease["held"], lease["settled"]), (0, 0, 1))
        yield self.checkBooks()


class ImageKeyTests(TrustedCase):

    @defer.inlineCallbacks
    def test_an_encrypted_images_key_reaches_only_the_attested_tpm(self):
        seller = yield self.trustedSeller(self.sam)
        key = os.urandom(32)
        self.imagekeys.keys[(self.aliceId, self.sha)] = key
        placed = yield self.order(vms=1, trusted=True)
        [vmId] = placed["vm_ids"]
        yield self.within(seller.started.get())
        self.assertEqual(seller.keys, {vmId: key})

    @defer.inlineCallbacks
    def test_a_binding_key_not_bound_to_the_quoted_state_gets_no_key(self):
        seller = yield self.trustedSeller(self.sam)
        self.imagekeys.keys[(self.aliceId, self.sha)] = os.urandom(32)
        real = seller.trusted.bindingKey

        async def loose(vm, nonce, pcrs):
            # A key whose policy is not the quoted PCR values.
            zeros = {str(i): "00" * 32 for i in fakeattest.PCRS}
            answer = await real(vm, nonce, json.dumps(zeros).encode())
            return answer

        seller.trusted.bindingKey = loose
        placed = yield self.order(vms=1, trusted=True)
        yield self.sleep(1)
        self.assertEqual((len(seller.started.pending), seller.keys), (0, {}))
        [vm] = (yield self.call(self.cli, commands.ListVMs))["vms"]
        self.assertIn("its image's key was not released", vm["reason"])
        self.assertEqual(placed["allocated"], 1)


    @defer.inlineCallbacks
    def test_trusted_leases_starting_together_on_one_seller_are_admitted_one_at_a_time(self):
        """
        A lease's quote, binding key and key release are not interleaved with
        another lease's on the same seller: the other's image, measured into
        PCR 23 in between, would leave the first key unwrappable.
        """
        seller = yield self.trustedSeller(self.sam)
        self.imagekeys.keys[(self.aliceId, self.sha)] = os.urandom(32)
        steps = []
        trusted = seller.trusted
        for name, where in (("attest", 1), ("bindingKey", 0), ("releaseKey", 0)):
            def logged(*args, _real=getattr(trusted, name), _name=name, _where=where):
                steps.append((_name, args[_where]))
                return _real(*args)
            setattr(trusted, name, logged)
        placed = yield self.order(vms=2, trusted=True)
        yield self.sleep(1)
        vms = placed["vm_ids"]
        self.assertEqual(sorted(seller.keys), sorted(vms))
        admissions = [step for step in steps if step[0] != "attest" or step[1] is not None]
        self.assertEqual(len(admissions), 6, steps)
        for start in (0, 3):
            self.assertEqual(len({v for _, v in admissions[start:start + 3]}), 1, steps)
            self.assertEqual([n for n, _ in admissions[start:start + 3]],
                             ["attest", "bindingKey", "releaseKey"])


def test_the_server_options_of_trusted_computing(tmp_path):
    import pytest
    from twisted.python import usage

    from cpushare import pki
    from cpushare.server.tap import Options
    from test.fakemarket import credentials

    ca = tmp_path / "vendor.pem"
    ca.write_bytes(pki.certToPEM(credentials().caCert))
    options = Options()
    options.parseOptions(["--data", str(tmp_path)])
    assert (options["tpm-cas"], options["attest-every"], options["trusted-commission-rate"]) \
        == ([], 300.0, 0)
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--tpm-ca", str(ca), "--tpm-test-ca",
                          str(ca), "--trusted-commission", "12.5", "--attest-every", "60"])
    assert len(options["tpm-cas"]) == 2
    assert options["trusted-commission-rate"] == 125_000
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    for bad, text in ((["--tpm-ca", str(tmp_path / "missing.pem")],
                       "--tpm-ca .*missing.pem: No such file"),
                      (["--tpm-test-ca", str(junk)], "--tpm-test-ca .*junk.pem: not a certificate"),
                      (["--trusted-commission", "60"], "--trusted-commission: .* 0 to 50 percent"),
                      (["--attest-every", "1"], "--attest-every must be 10 to 86400")):
        with pytest.raises(usage.UsageError, match=text):
            Options().parseOptions(["--data", str(tmp_path)] + bad)


def test_the_operator_keeps_the_tpm_policy_and_sees_the_enrolled_sellers(conn, capsys):
    from cpushare.server import admin
    from cpushare.server.db import store
    from test.unit.test_ledger import adminArguments

    def main(*words):
        code = admin.main(adminArguments(conn) + list(words))
        out, err = capsys.readouterr()
        return code, out + err

    qemu = "ab" * 32
    assert main("tpm-policy", "add", "qemu", qemu.upper()) == \
        (0, f"allowed: qemu {qemu}\nfirmware: none allowed\nkernel: none allowed\n"
            f"qemu: {qemu}\nclient: none allowed\n")
    code, out = main("tpm-policy", "add", "qemu", qemu)
    assert (code, out) == (1, f"cpushare-admin: qemu {qemu} is already allowed\n")
    for words, text in ((("add", "bios", qemu), "'bios' is not a kind"),
                        (("add", "qemu", "xyz"), "'xyz' is not a sha256 digest"),
                        (("remove", "client", qemu), f"client {qemu} is not allowed"),
                        (("any-firmware", "maybe"), "takes yes or no")):
        code, out = main("tpm-policy", *words)
        assert code == 1 and text in out, out
    code, out = main("tpm-policy", "any-firmware", "yes")
    assert "firmware: any\nkernel: any\n" in out
    assert store.transact(conn, tpmsql.policy)["allow_any_firmware"] is True
    code, out = main("tpm-policy", "remove", "qemu", qemu)
    assert "no longer allowed" in out and "qemu: none allowed" in out
    account = store.transact(conn, store.createAccount, "sam", "cd" * 32)
    assert store.transact(conn, tpmsql.enrol, "00" * 34, account, "cd" * 32, "ef" * 32,
                          "CN=Vendor CA", "0011") is None
    assert store.transact(conn, tpmsql.enrol, "00" * 34, account + 1, "aa" * 32, "ef" * 32,
                          "CN=Vendor CA", "0011") == \
        "this attestation key is enrolled by another account"
    store.transact(conn, tpmsql.recordResult, "00" * 34, None, "not attested: no answer")
    code, out = main("tpm-sellers")
    assert code == 0 and "sam" in out and "by CN=Vendor CA" in out
    assert "last: not attested: no answer" in out
    assert main("tpm-forget", "sam") == \
        (0, "forgot 1 TPM key of sam: its seller enrols again when it next connects\n")
    assert main("tpm-forget", "sam") == (1, "cpushare-admin: account 'sam' has no TPM key"
                                             " enrolled\n")
    assert main("tpm-sellers") == (0, "")


def test_the_command_line_asks_for_trusted_sellers_and_shows_them():
    from cpushare.client.cli.main import parser
    from cpushare.client.cli.market import formatSellers
    from cpushare.client.cli.screens import screenArguments
    from cpushare.client.cli.vms import formatDryRun

    for argv in (["sellers", "--trusted"], ["order", "place", "--image", "x.iso", "--trusted"]):
        assert screenArguments(parser().parse_args(argv)) == {"trusted": True}
    assert screenArguments(parser().parse_args(["sellers"])) == {}
    seller = {"name": "sam", "price": 10_000, "net_fee": 0, "cores": 2, "free_cores": 2,
              "memory": 1024, "free_memory": 1024, "rating": 0.5, "votes": 2,
              "connected": 0.0, "trusted_price": 15_000,
              "trust": "has no TPM enrolled (cpushare-seller --tpm)"}
    # No seller with a TPM: the table is as it always was.
    assert "TRUSTED" not in formatSellers([seller], 60.0)
    attested = dict(seller, name="tina", trust=None, attested=30.0)
    failed = dict(seller, name="fred", trust="not attested: no answer")
    lines = formatSellers([seller, attested, failed], 90.0).splitlines()
    assert lines[0].split()[-2:] == ["TRUSTED", "TRUSTED/CORE-H"]
    assert lines[1].split()[-2:] == ["-", "-"]
    assert lines[2].split()[-3:] == ["60s", "ago", "0.015"]
    assert lines[3].split()[-2:] == ["failed", "0.015"]
    out = formatDryRun({"allocated": 1, "hold": 1000, "premium": 26_000,
                        "plan": [{"group": 1, "seller": "tina", "price": 36_000,
                                  "hold": 1000}]}, 1, None)
    assert out.splitlines()[-1] == ("trusted computing costs 0.026 more an hour for these VMs"
                                    " at full tilt than their sellers' normal prices")


from test.unit.test_site_buyer import BuyerPagesCase  # noqa: E402


class TrustedPagesTests(TrustedSellers, BuyerPagesCase):
    """The web site's Trusted computing checkbox, its premium, and the market page."""

    async def setUp(self):
        await BuyerPagesCase.setUp(self)
        await self.allowHonestSellers()
        self.tina = await self.trustedSeller(await self.register("tina"), price=10_000,
                                             trusted_price=36_000)
        await self.seller("sam")
        self.alice = await self.loggedIn("alice")
        await self.store.run(admin.credit, "alice", 100 * MICRO, "funds for the tests")
        self.sha = await self.imageOf(self.alice)

    async def test_the_checkbox_reviews_the_premium_and_places_on_attested_sellers(self):
        page = await self.alice.get("/orders/new")
        self.assertIn('<input type="checkbox" name="trusted" value="1"> Trusted computing',
                      page.text)
        page = await self.alice.get(f"/orders/new?image={self.sha}&vms=1&cores=1&memory=256"
                                    "&trusted=1&review=1")
        self.assertEqual(page.status, 200, page)
        self.assertIn('name="trusted" value="1" checked', page.text)
        self.assertIn("Trusted computing costs <strong>0.026</strong> more an hour", page.text)
        self.assertIn("<td>tina</td>", page.text)
        self.assertNotIn("<td>sam</td>", page.text)
        fields = dict(re.findall(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)">',
                                 page.text))
        self.assertEqual(fields["trusted"], "1")
        placed = await self.alice.post("/orders", fields)
        self.assertEqual(placed.status, 303, placed)
        start = await self.within(self.tina.started.get())
        self.assertEqual(start["image"], self.sha)
        # Without the box: the cheaper untrusted price, no premium.
        page = await self.alice.get(f"/orders/new?image={self.sha}&vms=1&cores=1&memory=256"
                                    "&review=1")
        self.assertEqual(page.status, 200, page)
        self.assertNotIn("Trusted computing costs", page.text)

    async def test_the_market_page_shows_who_is_attested_and_screens_on_it(self):
        page = await self.alice.get("/?trusted=1&explain=1")
        self.assertEqual(page.status, 200, page)
        self.assertIn("<td>attested just now</td>", page.text)
        self.assertIn('<td class="num">0.036</td>', page.text)
        self.assertIn("has no TPM enrolled (cpushare-seller --tpm)", page.text)
        self.assertIn("1 of the sellers online pass these screens", page.shown)
        for bad in ("maybe", "2"):
            page = await self.alice.get(f"/orders/new?image={self.sha}&vms=1&cores=1"
                                        f"&memory=256&trusted={bad}&review=1")
            self.assertEqual(page.status, 400, page)
            self.assertIn("trusted must be true or false", page.shown)

    async def test_a_seller_sets_its_trusted_price_on_its_page(self):
        sam = await self.loggedIn("sally")
        token = (await sam.get("/seller")).csrf()
        page = await sam.post("/seller/terms", {"price": "0.01", "trusted_price": "0.025",
                                                "csrf": token})
        self.assertEqual((page.status, page.location), (303, "/seller?terms=changed"))
        account = await self.accountNamed("sally")
        self.assertEqual((await api.call(self.market, account, "terms"))["trusted_price"],
                         25_000)
        page = await sam.get("/seller")
        self.assertIn('name="trusted_price" type="text" inputmode="decimal" maxlength="20"'
                      ' value="0.025"', page.text)
        for bad, message in (("0", "trusted price: &#39;0&#39; is zero"),
                             ("lots", "trusted price: &#39;lots&#39; is not an amount")):
            page = await sam.post("/seller/terms", {"trusted_price": bad, "csrf": token})
            self.assertEqual(page.status, 400, page)
            self.assertIn(message, page.text)


class ReconnectTests(TrustedCase):

    @defer.inlineCallbacks
    def test_a_seller_that_reconnects_is_attested_again_or_its_lease_stops(self):
        seller = yield self.trustedSeller(self.sam)
        [vmId] = (yield self.order(vms=1, trusted=True))["vm_ids"]
        yield self.within(seller.started.get())
        yield self.close(seller)
        yield self.sleep(5)
        back = yield self.trustedSeller(self.sam, tpm=seller.tpm)
        kept = yield self.call(back, commands.ReattachVMs, vms=[vmId])
        self.assertEqual(kept["keep"], [vmId])
        reconnected = self.reactor.seconds()
        yield self.sleep(TIMEOUT + 1)
        [lease] = yield self.lease(vmId)
        self.assertGreater(lease["attested"], reconnected)
        self.assertEqual([a[0] for a in back.asked if a[0] is not None], [vmId])
        # Back again, without enrolling its TPM this time: the lease stops.
        yield self.close(back)
        yield self.sleep(1)
        bare = yield self.trustedSeller(self.sam, tpm=seller.tpm, enrol=False)
        yield self.call(bare, commands.ReattachVMs, vms=[vmId])
        stopped = yield self.within(bare.stopped.get(), TIMEOUT + 5)
        self.assertEqual(stopped, vmId)
        vms = (yield self.call(self.cli, commands.ListVMs, all=True))["vms"]
        self.assertEqual(vms[0]["reason"],
                         "not attested: its seller's TPM is not enrolled on its connection")


def test_the_seller_options_of_trusted_computing(monkeypatch):
    import pytest
    from twisted.python import usage
    from cpushare.client.home import Home
    from cpushare.client.options import ClientOptions
    from cpushare.client.seller.service import Options

    def noAccount(self):
        self.home = Home("/nonexistent")

    monkeypatch.setattr(ClientOptions, "postOptions", noAccount)
    with pytest.raises(usage.UsageError, match="--trusted-price is the price of trusted"
                                               " leases: give --tpm too"):
        Options().parseOptions(["--trusted-price", "0.02"])
    with pytest.raises(usage.UsageError, match="--trusted-price: "):
        Options().parseOptions(["--tpm", "/dev/tpmrm0", "--trusted-price", "free"])
    options = Options()
    options.parseOptions(["--tpm", "/dev/tpmrm0", "--trusted-price", "0.02", "--price", "0.01"])
    assert options.terms == {"price": 10_000, "trusted_price": 20_000}
    assert options["tpm"] == "/dev/tpmrm0"
    options = Options()
    options.parseOptions([])
    assert options["tpm"] is None and "trusted_price" not in options.terms


def test_the_seller_measures_once_and_begins_again_when_no_vm_runs(tmp_path):
    from test.fakemarket import MemoryReactor
    from cpushare.client.seller.trusted import fileDigest

    qemu = tmp_path / "qemu"
    qemu.write_bytes(b"QEMU")
    tpm = FakeTPMService(fakeattest.FakeTPM())
    vms = []
    seller = TrustedSeller(MemoryReactor(), tpm, str(tmp_path), str(qemu),
                           running=lambda: len(vms))

    def quote(vm=None, image=None):
        d = defer.ensureDeferred(seller.attest(b"n" * 32, vm, image))
        return json.loads(d.result["events"])

    image = "ab" * 32
    vms.append(7)
    # What an earlier run left in the PCR is reset before the first quote.
    tpm.tpm.measure("client", "0" * 64, "an earlier run")
    events = quote(7, image)
    assert tpm.resets == 1
    assert [(e["kind"], e["digest"]) for e in events if e["pcr"] == 23] == [
        ("client", CLIENT), ("qemu", fileDigest(str(qemu))), ("image", image)]
    # Measured once while the PCR holds it; a seller-wide quote with a VM running keeps it.
    assert quote(7, image) == events and quote() == events
    assert tpm.resets == 1
    vms.clear()
    events = quote()
    assert tpm.resets == 2
    assert [e["kind"] for e in events if e["pcr"] == 23] == ["client", "qemu"]
    refused = []
    defer.ensureDeferred(seller.attest(b"short")).addErrback(refused.append)
    assert str(refused[0].value) == "Attest: a nonce is 16 to 64 bytes"


def test_a_trusted_replicated_lease_keeps_the_commission_and_the_rest_waits(conn, market):
    """The commission is the market's at each bill; the seller's share waits for the verdict."""
    from cpushare.server.db import leases as leasesql
    from cpushare.server.money.billing import bill, openLease
    from cpushare.server.money.escrow import decide
    from cpushare.server.money.ledger import EARNINGS, FUNDS, HELD, PENDING
    from test.unit.test_billing import INTERVAL, PRICE, WINDOW, check, credit, run

    m = market
    credit(conn, m, 10 * MICRO)
    leaseId = run(conn, openLease, m["vm"], m["order"], m["alice"], m["sam"], "sam", PRICE,
                  0, 2, 1000.0, INTERVAL, WINDOW, verdict="pending", trusted=True,
                  commissionPpm=125_000)
    run(conn, leasesql.showedLife, leaseId, 1000.0)
    # Nothing is charged before a quote passed, whatever the seller says.
    assert run(conn, bill, leaseId, 1200.0, 0, 1600.0).charged == 0
    run(conn, leasesql.setAttested, leaseId, 1300.0)
    run(conn, leasesql.setAttested, leaseId, 1200.0)     # never backwards
    # 300 s of 2 cores up to the last good quote: 600 CPU s at 10 micro-units.
    assert run(conn, bill, leaseId, 1200.0, 0, 1600.0).charged == 6_000
    sam = run(conn, ledger.balances, m["sam"])
    assert (sam[EARNINGS], sam[PENDING]) == (0, 5_250)
    assert run(conn, ledger.balance, ledger.COMMISSION) == 750
    check(conn)
    # Rejected: the seller's share goes back to the buyer; the commission stays.
    decide_ = run(conn, decide, leaseId, "rejected")
    assert decide_.amount == 5_250
    run(conn, bill, leaseId, 1200.0, 0, 1700.0, True)
    alice = run(conn, ledger.balances, m["alice"])
    assert (alice[FUNDS], alice[HELD]) == (10 * MICRO - 750, 0)
    check(conn)


def test_without_the_tpm_library_only_the_tpm_options_are_refused(monkeypatch, tmp_path):
    """
    The TPM library is an extra of the package: a seller without a TPM, and
    a market that takes no enrolments, run without it; --tpm and --tpm-ca
    say what to install.
    """
    import sys
    import pytest
    from twisted.python import usage
    from cpushare import pki
    from cpushare.client.home import Home
    from cpushare.client.options import ClientOptions
    from cpushare.client.seller.service import Options as SellerOptions
    from cpushare.server.tap import Options as ServerOptions
    from test.fakemarket import credentials

    monkeypatch.setitem(sys.modules, "tpm2_pytss", None)      # import fails
    monkeypatch.setattr(ClientOptions, "postOptions",
                        lambda self: setattr(self, "home", Home("/nonexistent")))
    SellerOptions().parseOptions(["--price", "0.01"])
    ServerOptions().parseOptions(["--data", str(tmp_path)])
    with pytest.raises(usage.UsageError, match=r"--tpm: the TPM library tpm2-pytss is not"
                                               r" installed .*pip install 'cpushare\[tpm\]'"):
        SellerOptions().parseOptions(["--tpm", "/dev/tpmrm0"])
    ca = tmp_path / "vendor.pem"
    ca.write_bytes(pki.certToPEM(credentials().caCert))
    with pytest.raises(usage.UsageError, match=r"--tpm-ca: the TPM library tpm2-pytss is not"
                                               r" installed .*libtss2-dev"):
        ServerOptions().parseOptions(["--data", str(tmp_path), "--tpm-ca", str(ca)])
