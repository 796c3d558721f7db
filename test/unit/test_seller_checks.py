"""
A hostile market against the seller: every command the market sends is
checked before anything reaches QEMU's command line, a file path or the
seller's memory.  The market here is a bare AMP peer in memory; the seller
is the real SellerControl and VMHost, on a reactor that records the
processes it would spawn instead of spawning them.
"""

import os
import re

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols import amp
from twisted.test import iosim

from cpushare.client import marketchecks
from cpushare.client.session import ClientSessionFactory, ConnectError
from cpushare.client.seller.service import SellerControl, SellerSession
from cpushare.client.seller.vmhost import VMHost
from cpushare.protocol import commands, proof
from cpushare.server.session import ServerControl
from cpushare.vm import qemu

from test.unit import test_session

DIGEST = "ab" * 32
MAC = "0a:cb:00:00:00:07"
CACHE_CAP = 1024 * 1024 * 1024


class FakeTransport:
    pid = 4321

    def signalProcess(self, name):
        pass


class RecordingReactor(MemoryReactorClock):
    """A reactor that records the programs it is asked to spawn."""

    def __init__(self):
        MemoryReactorClock.__init__(self)
        self.spawned = []

    def spawnProcess(self, processProtocol, executable, args=(), env=None, path=None,
                     uid=None, gid=None, usePTY=False, childFDs=None):
        self.spawned.append(list(args))
        return FakeTransport()


class FakeCache:
    """The image cache: every image is already there, at a file of its own."""

    capBytes = CACHE_CAP

    def __init__(self, folder):
        self.folder = folder
        self.asked = []

    def acquire(self, sha256):
        pass

    def release(self, sha256):
        pass

    def inThread(self, fn, *args):
        return defer.maybeDeferred(fn, *args)

    def ensure(self, sha256, size, fetch):
        self.asked.append(sha256)
        path = os.path.join(self.folder, "image.iso")
        with open(path, "wb") as f:
            f.write(b"iso")
        return defer.succeed(path)


class Seller:
    """A seller offering 2 cores and 1024 MB, connected to a fake market."""

    def __init__(self, tmp_path):
        self.reactor = RecordingReactor()
        self.cache = FakeCache(str(tmp_path))
        self.host = VMHost(self.reactor, self.cache, "/usr/bin/qemu-system-x86_64",
                           cores=2, memory=1024)
        self.session = SellerSession(self.reactor, "seller", hello=False, host=self.host)
        self.control = SellerControl(self.session)
        self.market = amp.AMP()
        _, _, self.pump = iosim.connectedServerAndClient(
            lambda: self.control, lambda: self.market, greet=False)

    def call(self, command, **kw):
        """The seller's answer (a dict) or refusal (a Failure)."""
        answers = []
        self.market.callRemote(command, **kw).addBoth(answers.append)
        self.pump.flush()
        [answer] = answers
        return answer

    def send(self, command, **kw):
        """A command that wants no answer."""
        self.market.callRemote(command, **kw)
        self.pump.flush()


def startVM(**kw):
    values = dict(vm=7, image=DIGEST, size=1000, cores=1, memory=256, mac=MAC)
    values.update(kw)
    return values


def refusal(failure):
    """The error message the market got back for a refused command."""
    assert not isinstance(failure, dict), f"the seller accepted it: {failure}"
    assert failure.check(commands.BadRequest), failure
    return failure.getErrorMessage()


HOSTILE_STARTS = [
    # argv injection through the image, path traversal through the digest
    (dict(image="-drive file=/etc/shadow"), "image"),
    (dict(image="../../../../etc/shadow"), "image"),
    (dict(image="ab" * 31 + "/."), "image"),
    (dict(image=DIGEST + "\n"), "image"),
    (dict(image=DIGEST.upper()), "image"),
    (dict(image="\uff10" * 64), "image"),  # fullwidth digits
    (dict(image=""), "image"),
    # the MAC ends up inside a -device option: commas add options
    (dict(mac=MAC + ",romfile=/etc/shadow"), "mac"),
    (dict(mac="0a:cb:00:00:00:07\n"), "mac"),
    (dict(mac="0a:cb:00:00:00"), "mac"),
    (dict(mac="ff:ff:ff:ff:ff:ff"), "mac"),  # broadcast
    (dict(mac="0b:cb:00:00:00:07"), "mac"),  # multicast
    (dict(mac="00:16:3e:00:00:07"), "mac"),  # a vendor's (globally administered)
    (dict(mac="0A:CB:00:00:00:07"), "mac"),
    (dict(mac="0a-cb-00-00-00-07"), "mac"),
    # cores and memory beyond what this seller offers, or nonsense
    (dict(cores=10**6), "cores"),
    (dict(cores=3), "cores"),
    (dict(cores=0), "cores"),
    (dict(cores=-1), "cores"),
    (dict(memory=-1), "memory"),
    (dict(memory=0), "memory"),
    (dict(memory=63), "memory"),
    (dict(memory=2048), "memory"),
    (dict(memory=2**63), "memory"),
    # VM ids whose channels would be the control channel or overflow the mux
    (dict(vm=0), "vm"),
    (dict(vm=-1), "vm"),
    (dict(vm=2**31), "vm"),
    (dict(vm=2**63), "vm"),
    (dict(vm=10**30), "vm"),
    # images the cache could never hold, or of no size
    (dict(size=0), "size"),
    (dict(size=-1), "size"),
    (dict(size=CACHE_CAP + 1), "size"),
    (dict(size=2**70), "size"),
]


@pytest.mark.parametrize("hostile,field", HOSTILE_STARTS,
                         ids=[f"{f}={v!r}"[:60] for h, f in HOSTILE_STARTS for v in h.values()])
def test_a_hostile_start_is_refused_naming_the_field_and_runs_nothing(tmp_path, hostile, field):
    seller = Seller(tmp_path)
    with capturedLogs() as events:
        message = refusal(seller.call(commands.StartVM, **startVM(**hostile)))
    assert message.startswith(f"StartVM {field}: "), message
    assert seller.reactor.spawned == []
    assert seller.cache.asked == []
    assert seller.host.vms == {}
    # One line in the seller's log, without a traceback.
    lines = [e for e in events if e.get("log_level").name in ("warn", "error", "critical")]
    assert len(lines) == 1, lines
    assert "log_failure" not in lines[0]
    assert field in lines[0]["log_format"].format(**lines[0]) or \
        field in str(lines[0].get("why"))


def test_an_honest_start_runs_the_sandboxed_qemu_and_nothing_else(tmp_path):
    seller = Seller(tmp_path)
    assert seller.call(commands.StartVM, **startVM()) == {}
    [argv] = seller.reactor.spawned
    assert seller.cache.asked == [DIGEST]
    wrapper = qemu.idleWrapper()
    assert argv[:len(wrapper)] == wrapper
    assert argv[len(wrapper):] == [
        "/usr/bin/qemu-system-x86_64",
        "-name", "cpushare-vm-7",
        "-nodefaults", "-no-user-config", "-nographic",
        "-sandbox", qemu.SANDBOX,
        "-accel", "tcg", "-cpu", "max",
        "-smp", "1", "-m", "256",
        "-add-fd", "fd=5,set=1,opaque=image",
        "-drive", "file=/dev/fdset/1,if=ide,media=cdrom,readonly=on,format=raw",
        "-boot", "order=d,menu=off",
        "-netdev", "stream,id=net0,server=off,addr.type=fd,addr.str=3",
        "-device", "virtio-net-pci,netdev=net0,mac=0a:cb:00:00:00:07,romfile=",
        "-chardev", "stdio,id=console,signal=off",
        "-serial", "chardev:console",
        "-chardev", "socket,id=qmp,fd=4",
        "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", "socket,id=result,fd=6",
        "-device", "virtserialport,bus=vser0.0,chardev=result,name=org.cpushare.result",
    ]
    # The largest VM id whose channels fit the mux, and the rest of the offer.
    assert seller.call(commands.StartVM, **startVM(
        vm=2**31 - 1, cores=1, memory=768, mac="52:54:00:12:34:56")) == {}
    assert len(seller.reactor.spawned) == 2


def test_what_runs_counts_against_what_is_offered(tmp_path):
    seller = Seller(tmp_path)
    assert seller.call(commands.StartVM, **startVM(vm=1, cores=2, memory=512)) == {}
    message = refusal(seller.call(commands.StartVM, **startVM(vm=2, cores=1, memory=256)))
    assert message.startswith("StartVM cores: "), message
    message = refusal(seller.call(commands.StartVM, **startVM(vm=1, cores=0 + 1)))
    assert "already running" in message
    assert len(seller.reactor.spawned) == 1


@pytest.mark.parametrize("vm", [0, -1, 2**31, 2**63])
def test_stop_vm_checks_the_vm_id(tmp_path, vm):
    seller = Seller(tmp_path)
    message = refusal(seller.call(commands.StopVM, vm=vm))
    assert message.startswith("StopVM vm: "), message


def test_stopping_a_vm_that_is_not_here_is_no_such_vm(tmp_path):
    seller = Seller(tmp_path)
    assert seller.call(commands.StopVM, vm=5).check(commands.NoSuchVM)


@pytest.mark.parametrize("kw,field", [
    (dict(data=b"", back=-1), "back"),
    (dict(data=b"", back=commands.PROBE_CHUNK + 1), "back"),
    (dict(data=b"", back=2**63), "back"),
    (dict(data=b"x" * (commands.PROBE_CHUNK + 1)), "data"),
])
def test_a_probe_out_of_bounds_is_refused(tmp_path, kw, field):
    seller = Seller(tmp_path)
    message = refusal(seller.call(commands.Probe, nonce=proof.nonce(), **kw))
    assert message.startswith(f"Probe {field}: "), message


def test_an_honest_probe_is_answered(tmp_path):
    seller = Seller(tmp_path)
    nonce, data = proof.nonce(), b"x" * commands.PROBE_CHUNK
    answer = seller.call(commands.Probe, nonce=nonce, data=data)
    assert answer == {"digest": proof.probeDigest(nonce, data), "data": None}
    answer = seller.call(commands.Probe, nonce=nonce, data=b"", back=commands.PROBE_CHUNK)
    assert answer["data"] == proof.probeFill(nonce, commands.PROBE_CHUNK)


def test_channel_links_the_seller_never_asked_for_take_no_memory(tmp_path):
    seller = Seller(tmp_path)
    for channel in range(1, 5001):
        seller.send(commands.ChannelLinked, channel=channel, peer_session=1, peer_channel=2)
    assert seller.session.linked == {}


def test_an_unlink_reason_cannot_forge_log_lines(tmp_path):
    seller = Seller(tmp_path)
    with capturedLogs() as events:
        seller.send(commands.ChannelUnlinked, channel=3,
                    reason="gone\nERROR forged line " + "x" * 60000)
    [event] = [e for e in events if "unlinked" in e.get("log_format", "")]
    text = formatEvent(event)
    assert "\n" not in text and len(text) < 400, text


def rawStart(**kw):
    values = {k: str(v).encode() for k, v in startVM().items()}
    values.update(kw)
    return {k: v for k, v in values.items() if v is not None}


@pytest.mark.parametrize("raw,field", [
    (dict(vm=b"seven"), "vm"),
    (dict(vm=b""), "vm"),
    (dict(cores=b"1.5"), "cores"),
    (dict(image=b"\xff\xfe" * 32), "image"),
    (dict(mac=None), "mac"),
])
def test_a_malformed_field_is_refused_by_name_without_a_traceback(tmp_path, raw, field):
    seller = Seller(tmp_path)
    answers = []
    with capturedLogs() as events:
        seller.market.callRemoteString(b"StartVM", **rawStart(**raw)).addBoth(answers.append)
        seller.pump.flush()
    [failure] = answers
    assert failure.check(amp.RemoteAmpError)
    assert failure.value.errorCode == b"BAD_REQUEST"
    assert failure.value.description.startswith(f"StartVM {field}: "), \
        failure.value.description
    assert not [e for e in events if "log_failure" in e]
    assert seller.reactor.spawned == []
    # The connection stays up: an honest command is served afterwards.
    assert seller.call(commands.StartVM, **startVM()) == {}


def test_a_flood_of_refusals_is_logged_a_few_lines_a_minute(tmp_path):
    seller = Seller(tmp_path)
    with capturedLogs() as events:
        for vm in range(1000):
            refusal(seller.call(commands.StartVM, **startVM(vm=-vm)))
        seller.reactor.advance(marketchecks.REFUSAL_WINDOW)
    lines = [formatEvent(e) for e in events]
    assert len(lines) == marketchecks.REFUSALS_LOGGED + 1, lines
    assert f"refused {1000 - marketchecks.REFUSALS_LOGGED} more commands" in lines[-1]
    with capturedLogs() as events:
        refusal(seller.call(commands.StartVM, **startVM(vm=-1)))
    assert len(events) == 1


class HostileHeartbeatTests(test_session.MarketCase):
    """
    A market answering Hello with heartbeat settings that would make the
    client ping without pause (0), crash its heartbeat loop (negative) or
    never notice silence: the client refuses the connection, naming them.
    """

    timeout = 10

    def lieInHello(self, heartbeat, timeout):
        """The market keeps its own heartbeat and tells clients these settings."""
        dispatch = ServerControl._commandDispatch
        command, honest = dispatch[b"Hello"]

        def hostile(control, **kw):
            d = defer.maybeDeferred(honest, control, **kw)
            return d.addCallback(lambda answer: {**answer, "heartbeat": heartbeat,
                                                 "timeout": timeout})

        dispatch[b"Hello"] = (command, hostile)
        self.addCleanup(dispatch.__setitem__, b"Hello", (command, honest))

    @defer.inlineCallbacks
    def connectWith(self, heartbeat, timeout):
        """Why the seller refused the market's Hello answer, or None."""
        if not hasattr(self, "sam"):
            self.sam = yield self.register("sam")
        self.lieInHello(heartbeat, timeout)
        key, cert = self.sam
        session = yield self.endpoint(cert).connect(ClientSessionFactory(self.reactor, "seller"))
        why = None
        try:
            yield session.ready
        except ConnectError as e:
            why = str(e)
        else:
            session.transport.loseConnection()
        yield session.whenLost()
        return why

    @defer.inlineCallbacks
    def test_hostile_heartbeat_settings_are_refused(self):
        for heartbeat, timeout in ((0.0, 2.0), (-1.0, 2.0), (float("nan"), 2.0),
                                   (0.2, float("inf")), (1e-9, 2.0), (5.0, 1.0)):
            why = yield self.connectWith(heartbeat, timeout)
            self.assertIsNotNone(why, (heartbeat, timeout))
            self.assertIn("heartbeat", why)

    @defer.inlineCallbacks
    def test_sane_heartbeat_settings_are_kept(self):
        why = yield self.connectWith(0.2, 2.0)
        self.assertIsNone(why)


def test_an_unknown_command_is_refused_and_the_connection_stays(tmp_path):
    seller = Seller(tmp_path)
    answers = []
    with capturedLogs() as events:
        seller.market.callRemoteString(b"RunShell", argv=b"rm -rf /").addBoth(answers.append)
        seller.pump.flush()
    [failure] = answers
    assert failure.check(amp.UnhandledCommand), failure
    assert not [e for e in events if "log_failure" in e]
    assert seller.call(commands.StartVM, **startVM()) == {}


def test_mutated_starts_run_nothing_unless_they_are_honest(tmp_path):
    """2,000 StartVMs with one field mangled at random: no traceback, no stray QEMU."""
    import random
    rng = random.Random(9)
    seller = Seller(tmp_path)
    honest = {k: str(v).encode() for k, v in startVM().items()}
    spawned = 0
    with capturedLogs() as events:
        for vm in range(1, 2001):
            box = dict(honest, vm=str(vm).encode())
            field = rng.choice(sorted(box))
            value = bytearray(box[field])
            for _ in range(rng.randint(1, 4)):
                action = rng.randrange(3)
                position = rng.randint(0, len(value))
                if action == 0:
                    value.insert(position, rng.choice(b"-,=/.:\n 0123456789abcdefABCDEF\xff"))
                elif action == 1 and value:
                    del value[min(position, len(value) - 1)]
                elif value:
                    value[min(position, len(value) - 1)] = rng.randrange(256)
            box[field] = bytes(value)
            answers = []
            seller.market.callRemoteString(b"StartVM", **box).addBoth(answers.append)
            seller.pump.flush()
            [answer] = answers
            if not isinstance(answer, dict):
                assert answer.value.errorCode == b"BAD_REQUEST", answer
                continue
            # Accepted: it was still an honest request, and QEMU got exactly it.
            spawned += 1
            argv = seller.reactor.spawned[-1]
            assert argv[argv.index("-name") + 1] == f"cpushare-vm-{int(box['vm'])}"
            assert re.fullmatch(r"[0-9a-f]{64}", seller.cache.asked[-1])
            assert f"mac={box['mac'].decode()}," in argv[argv.index("-device") + 1]
            seller.host.vms.clear()  # make room for the next one
    assert spawned == len(seller.reactor.spawned)
    assert 0 < spawned < 2000
    for argv in seller.reactor.spawned:
        assert all("\n" not in a and "/etc" not in a for a in argv)
    assert not [e for e in events if "log_failure" in e]


class RecordingProxy:
    """A reactor, except that processes and adopted sockets are only recorded."""

    def __init__(self, real):
        self._real = real
        self.spawned = []

    def spawnProcess(self, processProtocol, executable, args=(), **kw):
        self.spawned.append(list(args))
        return FakeTransport()

    def adoptStreamConnection(self, fileno, family, factory):
        return None

    def __getattr__(self, name):
        return getattr(self._real, name)


class HostileMarketOverTheWireTests(test_session.MarketCase):
    """
    The market's own server code, joined to a real seller session in memory
    (test/fakemarket.py), sending it hostile StartVMs on its live
    connection: the refusals travel the real wire format and the seller
    stays connected.
    """

    @defer.inlineCallbacks
    def test_hostile_starts_over_the_wire_run_nothing(self):
        key, cert = yield self.register("sam")
        proxy = RecordingProxy(self.reactor)
        folder = self.mktemp()
        os.makedirs(folder)
        host = VMHost(proxy, FakeCache(folder), "/usr/bin/qemu-system-x86_64",
                      cores=2, memory=1024)
        seller = yield self.endpoint(cert).connect(ClientSessionFactory(
            self.reactor, "seller", sessionClass=SellerSession, host=host))
        info = yield seller.ready
        market = self.market.sessions[info["session"]]
        for hostile, field in HOSTILE_STARTS[::3]:
            with self.assertRaises(commands.BadRequest) as e:
                yield market.control.callRemote(commands.StartVM, **startVM(**hostile))
            self.assertTrue(str(e.exception).startswith(f"StartVM {field}: "), e.exception)
        self.assertEqual(proxy.spawned, [])
        yield market.control.callRemote(commands.StartVM, **startVM())
        [argv] = proxy.spawned
        self.assertIn("virtio-net-pci,netdev=net0,mac=0a:cb:00:00:00:07,romfile=", argv)
        self.assertTrue(seller.connected)
        host.vms.clear()
        seller.transport.loseConnection()
        yield seller.whenLost()
