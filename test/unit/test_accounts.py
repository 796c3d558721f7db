"""
Accounts under abuse: registration floods, one account per key,
suspension, revocation and rekeying.  The store's rules on SQLite and PostgreSQL; the market's
in one process over real TLS (test_session.MarketCase).
"""

import pytest
from twisted.internet import defer, task

from cpushare import pki
from cpushare.protocol import commands
from cpushare.server.db import store
from cpushare.server.access import RegistrationLimits, RegistrationRefused, addressKey
from cpushare.server.db.store import Account

from test.unit.test_session import MarketCase

# -- registration limits (on a clock)


def test_registrations_from_one_address_are_limited_an_hour():
    clock = task.Clock()
    limits = RegistrationLimits(clock, perAddress=5, perMinute=0)
    for _ in range(5):
        limits.take("192.0.2.7")
        clock.advance(1)
    with pytest.raises(RegistrationRefused,
                       match="at most 5 accounts an hour from one address"):
        limits.take("192.0.2.7")
    limits.take("192.0.2.8")                # another address is not held back
    clock.advance(3600 - 6)
    with pytest.raises(RegistrationRefused):
        limits.take("192.0.2.7")
    clock.advance(1)                        # the first one is an hour old
    limits.take("192.0.2.7")


def test_an_ipv6_host_counts_by_its_64():
    clock = task.Clock()
    limits = RegistrationLimits(clock, perAddress=2, perMinute=0)
    limits.take("2001:db8:1:2::1")
    limits.take("2001:db8:1:2:ffff::9")
    with pytest.raises(RegistrationRefused):
        limits.take("2001:db8:1:2:abcd::42")
    limits.take("2001:db8:1:3::1")
    assert addressKey("::ffff:192.0.2.1") == "192.0.2.1"


def test_the_market_wide_limit_bounds_a_flood_from_many_addresses_and_its_memory():
    clock = task.Clock()
    limits = RegistrationLimits(clock, perAddress=5, perMinute=30)
    accepted = refused = 0
    for i in range(20_000):                 # 200 a second for 100 seconds
        try:
            limits.take(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
            accepted += 1
        except RegistrationRefused as e:
            assert "at most 30 new accounts a minute" in str(e)
            refused += 1
        clock.advance(0.005)
    assert accepted <= 30 * 2 + 30       # two minutes began, and the one in progress
    assert limits.size() <= 2 * 30 * 60
    clock.advance(3601)
    limits.take("10.0.0.1")
    assert limits.size() == 2


def test_a_registration_given_back_does_not_count():
    clock = task.Clock()
    limits = RegistrationLimits(clock, perAddress=1, perMinute=1)
    limits.give(limits.take("192.0.2.7"))
    limits.take("192.0.2.7")


# -- the store: keys, suspension, revocation, changes of access


def test_one_account_per_public_key(conn):
    store.transact(conn, store.createAccount, "alice", "ab" * 32, "k1" * 32, "1")
    with pytest.raises(store.KeyTaken):
        store.transact(conn, store.createAccount, "bob", "cd" * 32, "k1" * 32, "2")
    assert [a["name"] for a in store.transact(conn, store.listAccounts)] == ["alice"]


def test_suspension_refuses_the_account_until_lifted_and_is_recorded(conn):
    store.transact(conn, store.createAccount, "alice", "ab" * 32)
    before = store.transact(conn, store.lastAccessChange)
    assert store.transact(conn, store.suspendAccount, "alice", "unpaid bills")
    assert not store.transact(conn, store.suspendAccount, "alice")
    account, reason = store.transact(conn, store.accountForCertificate, "ab" * 32)
    assert account is None and "'alice' is suspended since" in reason
    assert reason.endswith(": unpaid bills")
    [(_, _, fingerprint, what)] = store.transact(conn, store.accessChanges, before)
    assert (fingerprint, what) == (None, "suspended: unpaid bills")
    assert store.transact(conn, store.unsuspendAccount, "alice")
    account, _ = store.transact(conn, store.accountForCertificate, "ab" * 32)
    assert account.name == "alice"


def test_revoke_by_serial_fingerprint_or_account(conn):
    aliceId = store.transact(conn, store.createAccount, "alice", "ab" * 32, "k1", "1f2e")
    store.transact(conn, store.addReplacement, aliceId, "ab" * 32, "cd" * 32, "k2", "beef", 5)
    store.transact(conn, store.createAccount, "bob", "ef" * 32, "k3", "77")
    assert store.transact(conn, store.revoke, "00:1F:2E") == [("alice", "ab" * 32, "1f2e")]
    account, reason = store.transact(conn, store.accountForCertificate, "ab" * 32)
    assert account is None and "the certificate of account 'alice' was revoked" in reason
    # alice's other certificate still works; bob's by fingerprint, then all of alice's.
    assert store.transact(conn, store.accountForCertificate, "cd" * 32)[0].name == "alice"
    assert store.transact(conn, store.revoke, "EF" * 32) == [("bob", "ef" * 32, "77")]
    assert store.transact(conn, store.revoke, "alice") == [("alice", "cd" * 32, "beef")]
    with pytest.raises(LookupError, match="names no live certificate"):
        store.transact(conn, store.revoke, "alice")
    whats = [w for _, _, _, w in store.transact(conn, store.accessChanges, 0)]
    assert whats == ["revoked"] * 3


def test_a_replacement_revokes_the_old_certificate_at_its_first_use(conn):
    aliceId = store.transact(conn, store.createAccount, "alice", "ab" * 32, "k1", "1")
    store.transact(conn, store.addReplacement, aliceId, "ab" * 32, "cd" * 32, "k2", "2", 5)
    # Until the new one is used, the old one works (the client may not have stored it).
    assert store.transact(conn, store.accountForCertificate, "ab" * 32)[0] is not None
    # A second rekey from the old certificate revokes the unused first one.
    store.transact(conn, store.addReplacement, aliceId, "ab" * 32, "ef" * 32, "k3", "3", 5)
    assert "revoked" in store.transact(conn, store.accountForCertificate, "cd" * 32)[1]
    assert store.transact(conn, store.accountForCertificate, "ef" * 32)[0].name == "alice"
    account, reason = store.transact(conn, store.accountForCertificate, "ab" * 32)
    assert account is None and "revoked" in reason
    changes = store.transact(conn, store.accessChanges, 0)
    assert [(f, w) for _, _, f, w in changes] == [
        ("cd" * 32, "replaced by a newer rekey"), ("ab" * 32, "replaced by a new certificate")]
    with pytest.raises(store.RekeyRefused, match="no longer valid"):
        store.transact(conn, store.addReplacement, aliceId, "ab" * 32, "99" * 32, "k4", "4", 5)
    with pytest.raises(store.RekeyRefused, match="at most 3 certificates a day"):
        store.transact(conn, store.addReplacement, aliceId, "ef" * 32, "98" * 32, "k5", "5", 3)
    with pytest.raises(store.KeyTaken):
        store.transact(conn, store.addReplacement, aliceId, "ef" * 32, "97" * 32, "k1", "6", 5)


# -- the market, in process


class AccountMarketTests(MarketCase):

    @defer.inlineCallbacks
    def registerWith(self, name, key):
        session = yield self.connect(hello=False)
        try:
            result = yield session.control.callRemote(
                commands.Register, name=name, csr=pki.makeRequest(key, name))
        finally:
            yield self.close(session)
        return result["certificate"]

    @defer.inlineCallbacks
    def refusal(self, key, cert):
        """Why the market refuses this certificate's Hello."""
        session = yield self.connect("cli", key, cert, hello=False)
        with self.assertRaises(commands.NotAuthenticated) as e:
            yield session.control.callRemote(commands.Hello, role="cli", software="test")
        return str(e.exception)

    @defer.inlineCallbacks
    def test_a_registration_flood_from_one_address_is_refused_naming_the_limit(self):
        self.market.registrations = RegistrationLimits(task.Clock(), 5, 30)
        for i in range(5):
            yield self.register(f"user{i}")
        with self.assertRaises(commands.NotPermitted) as e:
            yield self.register("user5")
        self.assertEqual(str(e.exception), "registration refused: at most 5 accounts an hour "
                         "from one address; try again later")
        accounts = yield self.store.run(store.listAccounts)
        self.assertEqual(len(accounts), 5)

    @defer.inlineCallbacks
    def test_a_second_account_with_the_same_key_is_refused(self):
        key = pki.generateKey()
        yield self.registerWith("alice", key)
        with self.assertRaises(commands.NotPermitted) as e:
            yield self.registerWith("alice2", key)
        self.assertIn("this public key already belongs to an account", str(e.exception))
        self.assertEqual([a["name"] for a in (yield self.store.run(store.listAccounts))],
                         ["alice"])

    @defer.inlineCallbacks
    def test_a_suspended_account_loses_its_connection_at_the_next_check(self):
        yield defer.ensureDeferred(self.market.access.start())
        self.addCleanup(self.market.access.stop)
        key, cert = yield self.register("alice")
        session = yield self.connect("seller", key, cert)
        yield session.control.callRemote(commands.Offer, cores=1, memory=64)
        yield self.store.run(store.suspendAccount, "alice", "testing")
        self.assertTrue(session.connected)
        yield self.market.access.check()
        yield session.whenLost()
        self.assertEqual(self.market.sellers(), [])
        reason = yield self.refusal(key, cert)
        self.assertIn("'alice' is suspended since", reason)

    @defer.inlineCallbacks
    def test_rekey_gives_a_new_certificate_and_the_old_one_ends_at_its_first_use(self):
        yield defer.ensureDeferred(self.market.access.start())
        self.addCleanup(self.market.access.stop)
        key, cert = yield self.register("alice")
        old = yield self.connect("cli", key, cert)
        newKey = pki.generateKey()
        answer = yield old.control.callRemote(
            commands.Rekey, csr=pki.makeRequest(newKey, "alice"))
        newCert = answer["certificate"]
        # The same key cannot be certified twice.
        with self.assertRaises(commands.NotPermitted):
            yield old.control.callRemote(commands.Rekey, csr=pki.makeRequest(newKey, "alice"))
        new = yield self.connect("cli", newKey, newCert)
        who = yield new.control.callRemote(commands.WhoAmI)
        self.assertEqual((who["name"], who["fingerprint"]),
                         ("alice", pki.fingerprint(pki.loadCertificate(newCert))))
        yield self.market.access.check()
        yield old.whenLost()
        self.assertTrue(new.connected)
        reason = yield self.refusal(key, cert)
        self.assertIn("the certificate of account 'alice' was revoked", reason)

    @defer.inlineCallbacks
    def test_a_handshake_authenticated_while_its_account_is_suspended_is_refused(self):
        """The suspension is read between the handshake's query and its answer."""
        yield defer.ensureDeferred(self.market.access.start())
        self.addCleanup(self.market.access.stop)
        key, cert = yield self.register("alice")
        authenticate = self.market.authenticate
        stale = []

        def racing(fingerprint):
            d = authenticate(fingerprint)
            if not stale:
                def suspendMeanwhile(result):
                    stale.append(result)
                    d2 = self.store.run(store.suspendAccount, "alice", None)
                    d2.addCallback(lambda _: self.market.access.check())
                    return d2.addCallback(lambda _: result)
                d.addCallback(suspendMeanwhile)
            return d

        self.market.authenticate = racing
        reason = yield self.refusal(key, cert)
        self.assertIn("'alice' is suspended since", reason)
        self.assertIsNotNone(stale[0][0])       # the first answer was the stale one


class FakeSession:
    def __init__(self, accountId, certificate):
        self.account = Account(accountId, f"a{accountId}", 0.0)
        self.certificate = certificate
        self.ended = []

    def accessEnded(self, why):
        self.ended.append(why)


class FakeStore:
    def __init__(self):
        self.changes = []
        self.pending = None

    def run(self, fn, *args):
        if fn is store.lastAccessChange:
            return defer.succeed(0)
        assert fn is store.accessChanges
        self.pending = defer.Deferred()
        after = args[0]
        return self.pending.addCallback(lambda _: [c for c in self.changes if c[0] > after])


def test_the_access_watch_closes_only_the_sessions_a_change_concerns():
    from cpushare.server.access import AccessWatch

    clock = task.Clock()
    fakeStore = FakeStore()
    a1, a1other, b = FakeSession(1, "f1"), FakeSession(1, "f2"), FakeSession(2, "f3")
    watch = AccessWatch(clock, fakeStore, lambda: [a1, a1other, b], every=1.0)
    defer.ensureDeferred(watch.start())
    fakeStore.changes = [(1, 1, "f1", "revoked"), (2, 2, None, "deleted")]
    clock.advance(1.0)
    # While a query runs the next tick does not start another.
    first = fakeStore.pending
    clock.advance(1.0)
    assert fakeStore.pending is first
    first.callback(None)
    assert (a1.ended, a1other.ended, b.ended) == (["revoked"], [], ["deleted"])
    assert watch.changedSince(1, 0) and not watch.changedSince(1, 1)
    assert watch.lastId == 2
    clock.advance(1.0)
    fakeStore.pending.callback(None)     # nothing new: nothing closed twice
    assert (a1.ended, b.ended) == (["revoked"], ["deleted"])
    watch.stop()


def test_the_server_options_name_the_limits_and_refuse_nonsense(tmp_path):
    from twisted.python import usage

    from cpushare.server.tap import Options

    options = Options()
    options.parseOptions(["--data", str(tmp_path)])
    assert (options["registrations-per-address"], options["registrations-per-minute"],
            options["rekeys-per-day"], options["access-check"]) == (5, 30, 5, 1.0)
    for bad, text in ((["--registrations-per-minute", "-1"], r"0 \(no limit\) or more"),
                      (["--access-check", "0"], "--access-check must be above 0"),
                      (["--rekeys-per-day", "0"], "--rekeys-per-day must be 1 or more")):
        with pytest.raises(usage.UsageError, match=text):
            Options().parseOptions(["--data", str(tmp_path)] + bad)
