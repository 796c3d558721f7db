"""
The buyer's comparator: the buyer's program answering the market's
CompareResults with the command the buyer named for the order, and the
command line that names it.

A market may be hostile: it asks about orders without a comparator, VMs
without results, ids that cannot be; a comparator may hang or print
without end.  Real child processes run the comparators here (small Python
scripts), on the real reactor.
"""

import json
import os
import sys
import time
import tracemalloc

import pytest
from twisted.internet import defer, error, reactor, task
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial import unittest

from cpushare.client.buyer import comparator
from cpushare.client.buyer.comparator import Comparisons
from cpushare.client.home import comparatorPath, loadComparator, resultPath, saveComparator
from cpushare.protocol import commands
from test.fakemarket import MarketCase, MemoryReactor, Replies, command, control
from test.unit.test_results import fired

ORDER = 7


def results(home, order=ORDER, **files):
    """Save result files as the buyer's program does: results(home, **{"3": b"..."})."""
    for vm, data in files.items():
        path = resultPath(home, order, int(vm))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def script(home, name, text):
    """A comparator: sys.executable running the Python C{text}, as words."""
    path = os.path.join(home, name)
    with open(path, "w") as f:
        f.write(text)
    return [sys.executable, path]


class ProcessTransport(StringTransport):
    """What a spawned process is to its protocol, recording the signals sent."""

    def __init__(self):
        StringTransport.__init__(self)
        self.signals = []

    def closeStdin(self):
        pass

    def signalProcess(self, signal):
        self.signals.append(signal)


class RecordingReactor(MemoryReactor):
    """A fake reactor that records the processes it is asked to spawn."""

    def __init__(self):
        MemoryReactor.__init__(self)
        self.spawned = []

    def spawnProcess(self, processProtocol, executable, args=(), env=None, path=None,
                     uid=None, gid=None, usePTY=False, childFDs=None):
        self.spawned.append((processProtocol, executable, list(args)))
        processProtocol.makeConnection(ProcessTransport())


def quickly(home):
    """Comparisons on a fake reactor (its 'thread' work runs at once): L{spawned}."""
    return Comparisons(RecordingReactor(), home)


def spawned(comparisons):
    return comparisons.reactor.spawned


# -- a hostile market's questions: answered without running anything


@pytest.mark.parametrize("order, a, b, why", [
    (0, 1, 2, "order is 0"),
    (-5, 1, 2, "order is -5"),
    (ORDER, -1, 2, "a is -1"),
    (ORDER, 1, 2 ** 63, f"b is {2 ** 63}"),
    (10 ** 40, 1, 2, f"order is {10 ** 40}"),
    (ORDER, 4, 4, "VM 4 compared with itself"),
])
def test_ids_no_result_can_have_are_refused_by_name(tmp_path, order, a, b, why):
    home = str(tmp_path)
    saveComparator(home, ORDER, [sys.executable, "-c", "pass"])
    results(home, **{"1": b"x", "2": b"x", "4": b"x"})
    comparisons = quickly(home)
    refused = fired(comparisons.compare(order, a, b))
    assert isinstance(refused, Failure) and refused.check(commands.BadRequest)
    assert why in refused.getErrorMessage()
    assert spawned(comparisons) == []


def test_an_order_without_a_comparator_here_is_answered_with_an_error(tmp_path):
    home = str(tmp_path)
    results(home, **{"1": b"x", "2": b"y"})
    comparisons = quickly(home)
    assert fired(comparisons.compare(ORDER, 1, 2)) == {
        "same": False, "error": f"no comparator for order {ORDER} on this computer"}
    assert spawned(comparisons) == []


@pytest.mark.parametrize("content", [
    b"", b"not json", b"\xff\xfe", b"[]", b'{"argv": []}', b'{"argv": "cmp a b"}',
    b'{"argv": [""]}', b'{"argv": ["cmp", 3]}', b'{"argv": ["cm\\u0000p"]}', b'{"other": 1}',
    b"[" * 100_000, b'{"argv": ["' + b"x" * 70_000 + b'"]}',
])
def test_a_malformed_comparator_file_is_no_comparator(tmp_path, content):
    home = str(tmp_path)
    path = comparatorPath(home, ORDER)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(content)
    results(home, **{"1": b"x", "2": b"y"})
    assert loadComparator(home, ORDER) is None
    assert fired(quickly(home).compare(ORDER, 1, 2))["error"] == \
        f"no comparator for order {ORDER} on this computer"


@pytest.mark.parametrize("present, missing", [("1", 2), ("2", 1)])
def test_a_missing_result_file_is_named(tmp_path, present, missing):
    home = str(tmp_path)
    saveComparator(home, ORDER, [sys.executable, "-c", "pass"])
    results(home, **{present: b"x"})
    # A result still arriving (.part) is no result either.
    results(home, **{str(missing): b""})
    os.rename(resultPath(home, ORDER, missing), resultPath(home, ORDER, missing) + ".part")
    assert fired(quickly(home).compare(ORDER, 1, 2)) == {
        "same": False, "error": f"no result of VM {missing} of order {ORDER} on this computer"}


def test_a_comparator_that_is_not_a_program_here_is_an_error_without_its_words(tmp_path):
    home = str(tmp_path)
    results(home, **{"1": b"x", "2": b"y"})
    for argv in (["no-such-comparator-anywhere", "--secret-flag"],
                 [str(tmp_path / "missing.py")], [str(tmp_path)]):
        saveComparator(home, ORDER, argv)
        comparisons = quickly(home)
        answer = fired(comparisons.compare(ORDER, 1, 2))
        assert answer == {"same": False, "error": f"the comparator of order {ORDER} cannot"
                                                  " run on this computer"}
        assert spawned(comparisons) == []


def test_at_most_two_comparisons_run_at_once_the_rest_wait_their_turn(tmp_path):
    home = str(tmp_path)
    comparisons = Comparisons(RecordingReactor(), home, timeout=60)
    fake = comparisons.reactor
    saveComparator(home, ORDER, [sys.executable, "-c", "pass"])
    results(home, **{str(vm): b"x" for vm in range(1, 6)})
    answers = [comparisons.compare(ORDER, 1, b) for b in (2, 3, 4, 5)]
    assert len(fake.spawned) == 2
    first = fake.spawned[0][0]
    first.processEnded(Failure(error.ProcessDone(0)))
    assert fired(answers[0]) == {"same": True}
    assert len(fake.spawned) == 3
    assert fake.spawned[2][2][-2:] == [resultPath(home, ORDER, 1), resultPath(home, ORDER, 4)]
    # The rest: each timer of the fake clock runs out; the queue drains.
    fake.advance(60)
    assert fired(answers[1]) == {"same": False,
                                 "error": "the comparator did not finish in 60 s"}
    assert fake.spawned[1][0].transport.signals == ["KILL"]
    assert len(fake.spawned) == 4
    fake.advance(60)
    assert [a.called for a in answers] == [True] * 4


class HeldPool:
    """A thread pool whose work waits until the test runs it."""

    def __init__(self):
        self.held = []

    def callInThreadWithCallback(self, onResult, f, *args, **kw):
        self.held.append((onResult, f, args))

    def runAll(self):
        while self.held:
            onResult, f, args = self.held.pop(0)
            try:
                onResult(True, f(*args))
            except Exception as e:
                onResult(False, e)


def test_a_result_still_being_checked_is_waited_for_before_comparing(tmp_path):
    import hashlib
    from cpushare.client.buyer.results import ResultFiles
    home = str(tmp_path)
    fake = RecordingReactor()
    fake._pool = pool = HeldPool()
    files = ResultFiles(fake, home)
    comparisons = Comparisons(fake, home, results=files)
    saveComparator(home, ORDER, [sys.executable, "-c", "pass"])
    results(home, **{"1": b"0.3"})
    files.chunk(ORDER, 2, 0, b"0.30000000000000004")
    pool.runAll()
    # The last of VM 2's result arrived: while it is hashed, the market asks.
    files.ready(ORDER, 2, hashlib.sha256(b"0.30000000000000004").hexdigest(), 19)
    answer = comparisons.compare(ORDER, 1, 2)
    assert not answer.called and fake.spawned == []
    pool.runAll()   # the check: the file gets its name
    pool.runAll()   # the comparison's own look at the files
    [(child, program, argv)] = fake.spawned
    assert argv[-1] == resultPath(home, ORDER, 2)
    child.processEnded(Failure(error.ProcessDone(0)))
    assert fired(answer) == {"same": True}


# -- real comparators on the real reactor


SAME_FILES = """
import sys
a, b = (open(p, "rb").read() for p in sys.argv[-2:])
sys.exit(0 if abs(float(a) - float(b)) < 1e-9 else 1)
"""


class RunningComparators(unittest.TestCase):
    """Comparators as child processes, on the real reactor."""

    def setUp(self):
        self.home = self.mktemp()
        os.makedirs(self.home)
        self.events = []
        self.comparisons = Comparisons(reactor, self.home, timeout=1)
        self.comparisons.log = Logger(observer=self.events.append)
        results(self.home, **{"1": b"0.30000000000000004\n", "2": b"0.3\n", "3": b"0.4\n"})

    def comparing(self, a, b, argv):
        saveComparator(self.home, ORDER, argv)
        return self.comparisons.compare(ORDER, a, b)

    @defer.inlineCallbacks
    def test_a_comparator_that_hangs_is_killed_at_the_timeout_and_the_reactor_runs_on(self):
        ticks = []
        beat = task.LoopingCall(lambda: ticks.append(time.monotonic()))
        beat.start(0.05)
        started = time.monotonic()
        answer = yield self.comparing(1, 2, [sys.executable, "-c", "import time; time.sleep(60)"])
        took = time.monotonic() - started
        beat.stop()
        self.assertEqual(answer, {"same": False, "error": "the comparator did not finish in 1 s"})
        self.assertLess(took, 5)
        gaps = [b - a for a, b in zip(ticks, ticks[1:])]
        self.assertGreater(len(ticks), 10)
        self.assertLess(max(gaps), 0.5, "the reactor waited for the comparator")
        [warned] = [e for e in self.events if "was killed" in e["log_format"]]

    @defer.inlineCallbacks
    def test_a_comparator_that_prints_megabytes_keeps_only_its_last_bytes(self):
        prints = ("import sys\n"
                  "for i in range(512): sys.stdout.write('x' * 65536)\n"
                  "sys.stdout.write('the last words')\n"
                  "sys.exit(3)\n")
        self.comparisons.timeout = 60
        tracemalloc.start()
        try:
            answer = yield self.comparing(1, 3, script(self.home, "prints.py", prints))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(answer, {"same": False})
        self.assertLess(peak, 8 * 1024 * 1024, "32 MiB of output was kept")
        [said] = [e for e in self.events if "not the same" in e.get("what", "")]
        self.assertTrue(said["output"].endswith("the last words"))
        self.assertLessEqual(len(said["output"]), len(" (exit status 3); its output ended"
                                                      " with: ") + 100 + comparator.OUTPUT_KEPT)

    @defer.inlineCallbacks
    def test_shell_metacharacters_in_a_comparator_are_passed_literally(self):
        seen = os.path.join(self.home, "argv.json")
        records = ("import json, sys\n"
                   f"json.dump(sys.argv[1:], open({seen!r}, 'w'))\n")
        hostile = ["; touch pwned", "$(touch pwned)", "`touch pwned`", "a b | c > d", "*"]
        answer = yield self.comparing(1, 2, script(self.home, "records.py", records) + hostile)
        self.assertEqual(answer, {"same": True})
        with open(seen) as f:
            self.assertEqual(json.load(f), hostile + [resultPath(self.home, ORDER, 1),
                                                      resultPath(self.home, ORDER, 2)])
        self.assertFalse(os.path.exists("pwned"))
        self.assertFalse(os.path.exists(os.path.join(self.home, "pwned")))

    @defer.inlineCallbacks
    def test_exit_zero_is_the_same_and_any_other_exit_is_not(self):
        argv = script(self.home, "same.py", SAME_FILES)
        self.assertEqual((yield self.comparing(1, 2, argv)), {"same": True})
        self.assertEqual((yield self.comparing(2, 3, argv)), {"same": False})
        killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]
        self.assertEqual((yield self.comparing(1, 2, killed)), {"same": False})


# -- over the wire: the buyer's program answers the market


def test_the_buyer_program_answers_compare_results_and_refuses_bad_ids(tmp_path):
    from test.unit.test_fuzz import HELLO_ANSWER, _withGreeting, clientConnection
    home = str(tmp_path)
    fake, session, transport = clientConnection("buyer")
    session.buyer.comparisons = quickly(home)
    session.dataReceived(control(amp.AmpBox({**HELLO_ANSWER, b"_answer": b"1"}).serialize()))
    transport.clear()
    results(home, **{"1": b"x", "2": b"y"})
    for tag, (order, a, b) in enumerate([(ORDER, 1, 2), (-1, 1, 2), (ORDER, 1, 10 ** 30)],
                                        start=50):
        session.dataReceived(control(command("CompareResults", tag, order=str(order).encode(),
                                              a=str(a).encode(), b=str(b).encode())))
    fake.advance(0)
    replies = Replies(_withGreeting(transport))
    assert replies.answer(50) == {b"_answer": b"50", b"same": b"False",
                                  b"error": b"no comparator for order 7 on this computer"}
    # (The protocol refuses an integer AMP cannot carry before the program sees it.)
    for tag, why in ((51, b"order is -1"), (52, b"b: " + str(10 ** 30).encode())):
        refused = replies.answer(tag)
        assert refused[b"_error_code"] == b"BAD_REQUEST" and why in refused[b"_error_description"]
    assert session.connected


class MarketAsks(MarketCase):
    """The market's own session asking a real buyer program's session, in memory."""

    @defer.inlineCallbacks
    def test_the_market_asks_by_ids_and_the_buyer_program_answers(self):
        from cpushare.client.buyer.service import Buyer, BuyerSession
        from cpushare.client.session import connectOnce
        from test.unit.test_fuzz import RecordingNetwork
        key, cert = yield self.register("bob")
        home = self.mktemp()
        os.makedirs(home)
        comparisons = Comparisons(RecordingReactor(), home, timeout=60)
        session = yield connectOnce(self.reactor, self.endpoint(cert), "buyer",
                                    host="localhost", port=7000, sessionClass=BuyerSession,
                                    buyer=Buyer(RecordingNetwork(), None, comparisons))
        self.closedAtTheEnd(session)
        market = self.market.buyerSession(session.info["account_id"]).control

        answer = yield self.within(market.callRemote(commands.CompareResults, order=ORDER,
                                                     a=1, b=2))
        self.assertEqual(answer, {"same": False,
                                  "error": f"no comparator for order {ORDER} on this computer"})
        saveComparator(home, ORDER, [sys.executable, "-c", "pass"])
        results(home, **{"1": b"x", "2": b"y"})
        asked = market.callRemote(commands.CompareResults, order=ORDER, a=1, b=2)
        yield self.sleep(1)
        [(child, program, argv)] = comparisons.reactor.spawned
        self.assertEqual(argv, [sys.executable, "-c", "pass", resultPath(home, ORDER, 1),
                                resultPath(home, ORDER, 2)])
        child.processEnded(Failure(error.ProcessTerminated(1)))
        self.assertEqual((yield self.within(asked)), {"same": False, "error": None})
        refused = yield self.assertFailure(
            market.callRemote(commands.CompareResults, order=ORDER, a=2, b=2),
            commands.BadRequest)
        self.assertIn("VM 2 compared with itself", str(refused))
        self.assertTrue(session.connected)


# -- the command line: --compare, --replicas auto, and the verdicts shown


def placeArgs(*words):
    from cpushare.client.cli.main import parser
    return parser().parse_args(["order", "place", "--image", "a" * 64, *words])


def test_replicas_auto_asks_for_adaptive_replication_and_k_is_still_a_number():
    from cpushare.client.cli.main import parser
    from cpushare.client.cli.screens import replicaArguments
    assert replicaArguments(placeArgs("--replicas", "auto")) == {"adaptive": True}
    assert replicaArguments(placeArgs("--replicas", "3")) == {"replicas": 3}
    for bad in (["order", "place", "--image", "a" * 64, "--replicas", "many"],
                ["sellers", "--replicas", "auto"]):
        with pytest.raises(SystemExit):
            parser().parse_args(bad)
    order = parser()._subparsers._group_actions[0].choices["order"]
    place = order._subparsers._group_actions[0].choices["place"].format_help()
    assert "K|auto" in place and "--compare" in place


@pytest.mark.parametrize("words, why", [
    (["--compare", "cmp"], "--compare needs --replicas K or --replicas auto"),
    (["--replicas", "2", "--compare", ""], "--compare: the command is empty"),
    (["--replicas", "2", "--compare", "   "], "--compare: the command is empty"),
    (["--replicas", "2", "--compare", "cmp 'unclosed"], "cannot be split into words"),
    (["--replicas", "2", "--compare", "no-such-comparator-anywhere a"],
     "--compare: 'no-such-comparator-anywhere' is not a program on this computer"),
    (["--replicas", "2", "--compare", "/nonexistent/cmp"], "is not a program on this computer"),
])
def test_a_comparator_that_cannot_run_is_refused_by_name(words, why):
    from cpushare.client.cli.connection import CommandError
    from cpushare.client.cli.screens import comparatorWords
    with pytest.raises(CommandError, match=why.replace("(", r"\(")):
        comparatorWords(placeArgs(*words))


def test_a_comparator_is_split_like_a_shell_but_its_metacharacters_are_words(
        tmp_path, monkeypatch):
    from cpushare.client.cli.screens import comparatorWords
    words = comparatorWords(placeArgs(
        "--replicas", "auto", "--compare",
        f"{sys.executable} compare.py --tolerance '1e-9; rm -rf ~' \"$(reboot)\" '*'"))
    assert words == [sys.executable, "compare.py", "--tolerance", "1e-9; rm -rf ~",
                     "$(reboot)", "*"]
    # A program named by name is kept by its full path: the buyer's program
    # runs the same one whatever its own PATH.
    assert comparatorWords(placeArgs("--replicas", "2", "--compare", "cmp -s")) == \
        [os.path.abspath(__import__("shutil").which("cmp")), "-s"]
    script = tmp_path / "same.py"
    script.write_text("")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    assert comparatorWords(placeArgs("--replicas", "2", "--compare", "./same.py"))[0] == \
        str(script)


class FakeConnection:
    """The market for the command line: records each call and answers from C{answers}."""

    calls = []
    answers = {}

    def __init__(self, reactor, home):
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def call(self, command, **kw):
        self.calls.append((command, kw))
        return self.answers[command]

    async def every(self, command, name, key, cursor, **kw):
        self.calls.append((command, kw))
        return self.answers[command]


def placing(monkeypatch, tmp_path, *words):
    """Run `cpushare order place` with C{words}; the PlaceOrder arguments sent."""
    from cpushare.client.cli import vms
    from cpushare.client.home import Home
    FakeConnection.calls = []
    FakeConnection.answers = {commands.PlaceOrder: {"order": 12, "vm_ids": [30, 31],
                                                    "allocated": 2, "hold": 0, "plan": []}}
    monkeypatch.setattr(vms, "Connection", FakeConnection)
    args = placeArgs(*words)
    fired(defer.ensureDeferred(vms.orderPlace(MemoryReactor(), args, Home(str(tmp_path)))))
    [(cmd, sent)] = FakeConnection.calls
    assert cmd is commands.PlaceOrder
    return sent


def test_order_place_sends_only_that_there_is_a_comparator_and_keeps_it_here(
        monkeypatch, tmp_path, capsys):
    sent = placing(monkeypatch, tmp_path, "--replicas", "auto", "--compare",
                   f"{sys.executable} -c 'import sys; sys.exit(0)'")
    assert sent["compare"] is True and sent["adaptive"] is True and "replicas" not in sent
    assert sys.executable not in repr(sent) and "import" not in repr(sent)
    home = str(tmp_path)
    with open(comparatorPath(home, 12)) as f:
        assert json.load(f) == {"argv": [sys.executable, "-c", "import sys; sys.exit(0)"]}
    assert loadComparator(home, 12) == [sys.executable, "-c", "import sys; sys.exit(0)"]
    assert os.stat(comparatorPath(home, 12)).st_mode & 0o077 == 0
    out = capsys.readouterr().out
    assert "order 12: VMs 30, 31" in out
    assert "compared on this computer by your buyer program with:" in out


def test_a_dry_run_keeps_no_comparator(monkeypatch, tmp_path, capsys):
    sent = placing(monkeypatch, tmp_path, "--replicas", "2", "--compare", "cmp -s",
                   "--dry-run")
    assert sent["replicas"] == 2 and sent["compare"] is True and sent["dry_run"] is True
    assert not os.path.exists(os.path.join(str(tmp_path), "compare"))
    assert "nothing was placed" in capsys.readouterr().out


def test_an_order_without_compare_sends_none_and_keeps_nothing(monkeypatch, tmp_path):
    sent = placing(monkeypatch, tmp_path, "--replicas", "3")
    assert "compare" not in sent and "adaptive" not in sent
    assert not os.path.exists(os.path.join(str(tmp_path), "compare"))


def test_results_show_each_replicas_lease_and_verdict_and_json_passes_them_on(
        monkeypatch, tmp_path, capsys):
    from cpushare.client.cli import vms
    from cpushare.client.cli.main import parser
    from cpushare.client.home import Home
    rows = [
        {"vm": 8, "replica_group": 1, "state": "stopped", "seller": "it", "lease": 40,
         "sha256": "a" * 64, "size": 3, "verdict": "accepted"},
        {"vm": 9, "replica_group": 1, "state": "stopped", "seller": "de", "lease": 41,
         "sha256": "b" * 64, "size": 3, "verdict": "rejected"},
        {"vm": 10, "replica_group": 2, "state": "running", "seller": "fr", "lease": 42,
         "verdict": "pending"},
        {"vm": 11, "state": "pending", "lease": None, "verdict": None},
    ]
    table = vms.formatResults(rows, 0).splitlines()
    assert table[0].split() == ["GROUP", "VM", "LEASE", "SELLER", "COUNTRY", "CPU", "STATE",
                                "SIZE", "SHA256", "VERDICT", "SAVED"]
    # A VM of no replica group comes first, without a lease or a verdict yet.
    assert table[1].split()[:3] == ["-", "11", "-"] and table[1].split()[-2:] == ["-", "-"]
    assert table[2].split() == ["1", "8", "40", "it", "-", "-", "stopped", "3", "a" * 64,
                                "accepted", "-"]
    assert table[3].split()[2] == "41" and table[3].split()[-2] == "rejected"
    assert table[4].split()[-2:] == ["pending", "-"]
    FakeConnection.answers = {commands.ListResults: [dict(r) for r in rows]}
    monkeypatch.setattr(vms, "Connection", FakeConnection)
    args = parser().parse_args(["results", "12", "--json"])
    fired(defer.ensureDeferred(vms.listResults(MemoryReactor(), args, Home(str(tmp_path)))))
    assert FakeConnection.calls[-1] == (commands.ListResults, {"order": 12})
    shown = json.loads(capsys.readouterr().out)
    assert [(r["vm"], r.get("lease"), r.get("verdict")) for r in shown] == [
        (8, 40, "accepted"), (9, 41, "rejected"), (10, 42, "pending"), (11, None, None)]
