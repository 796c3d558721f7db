"""
Whether two results of a replica group are the same, as the buyer's own
command says: the answer to the market's CompareResults.

`cpushare order place --compare 'CMD ARGS'` keeps CMD, split into words,
in HOME/compare/ORDER.json (L{cpushare.client.home.comparatorPath}); the
market learns only that the order has a comparator.  When two replicas'
digests differ, the market asks CompareResults(order, a, b) and this
program runs the words + [VM a's result file, VM b's] (HOME/results/ORDER/
VM.result) as a child process, never through a shell: exit status 0 means
the same, any other not.  The market names only integers, so it can never
make this computer run anything but what the buyer named for that order.

A comparison that does not end in COMPARE_TIMEOUT seconds is killed; at
most COMPARE_CONCURRENCY run at once (the rest wait their turn); of what a
comparator prints, only the last OUTPUT_KEPT bytes are kept, for the log.
What is wrong is told to the market without the command's words, which
stay on this computer (the log has them).
"""

import os
import shutil

from twisted.internet import defer, error, protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from cpushare.client.home import loadComparator, resultPath
from cpushare.protocol.commands import BadRequest

COMPARE_TIMEOUT = 300       # seconds a comparison may take before it is killed
COMPARE_CONCURRENCY = 2     # comparisons running at once
OUTPUT_KEPT = 4096          # bytes of a comparator's output kept for the log
MAX_ID = 2 ** 63 - 1        # the largest order or VM id the market can have


class _Refused(Exception):
    """This computer cannot compare: the message says why, for the market."""


def _badIds(order, a, b):
    """Why the market's CompareResults names no results this program can have, or None."""
    for what, value in (("order", order), ("a", a), ("b", b)):
        if not 1 <= value <= MAX_ID:
            return f"{what} is {value}: ids are 1 to {MAX_ID}"
    if a == b:
        return f"VM {a} compared with itself"
    return None


class Comparisons:
    """The comparisons the market asks of the buyer whose home is C{home}."""

    log = Logger()

    def __init__(self, reactor, home, timeout=COMPARE_TIMEOUT,
                 concurrency=COMPARE_CONCURRENCY, results=None):
        self.reactor = reactor
        self.home = home
        self.results = results      # the ResultFiles saving results under home, if any
        self.timeout = timeout
        self.running = defer.DeferredSemaphore(concurrency)

    def compare(self, order, a, b):
        """
        A Deferred of CompareResults' answer: C{{"same": bool}}, with
        C{"error"} (and C{same} false) when there is no answer; a request
        that cannot name results of this buyer fails with L{BadRequest}.
        """
        bad = _badIds(order, a, b)
        if bad is not None:
            return defer.fail(BadRequest(f"CompareResults: {bad}"))
        # A result whose last bytes just arrived is still being checked
        # (L{cpushare.client.buyer.results}): its file has its name after.
        d = defer.succeed(None)
        if self.results is not None:
            d = defer.gatherResults([self.results.checked(order, vm) for vm in (a, b)])
        return d.addCallback(lambda _: self.running.run(self._compare, order, a, b))

    def _compare(self, order, a, b):
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                              self._prepare, order, a, b)
        d.addCallback(lambda argv: self._run(order, argv))
        d.addErrback(_refusal)
        return d

    def _prepare(self, order, a, b):
        """(In a thread.) The command to run: the comparator's words and the two files."""
        argv = loadComparator(self.home, order)
        if argv is None:
            raise _Refused(f"no comparator for order {order} on this computer")
        program = argv[0] if os.sep in argv[0] else shutil.which(argv[0])
        if program is None or not os.path.isfile(program) or not os.access(program, os.X_OK):
            self.log.warn("order {order}'s comparator {program!r} is not a program this"
                          " computer can run", order=order, program=argv[0])
            raise _Refused(f"the comparator of order {order} cannot run on this computer")
        files = []
        for vm in (a, b):
            path = resultPath(self.home, order, vm)
            if not os.path.isfile(path):
                raise _Refused(f"no result of VM {vm} of order {order} on this computer")
            files.append(path)
        return [program] + argv[1:] + files

    def _run(self, order, argv):
        """Run C{argv}; a Deferred of the answer once it exits or is killed."""
        child = _Comparator()
        try:
            self.reactor.spawnProcess(child, argv[0], argv, env=dict(os.environ),
                                      childFDs={0: "w", 1: "r", 2: "r"})
        except (OSError, ValueError) as e:
            self.log.warn("order {order}'s comparator did not start: {why}",
                          order=order, why=str(e))
            return {"same": False,
                    "error": f"the comparator of order {order} cannot run on this computer"}
        answer = defer.Deferred()

        def decide(status):
            if answer.called:
                return
            if timer.active():
                timer.cancel()
            if status is None:
                self.log.warn("order {order}'s comparator did not finish in {timeout} s and"
                              " was killed; its output ended with: {output}", order=order,
                              timeout=self.timeout, output=child.output())
                answer.callback({"same": False, "error": f"the comparator did not finish in"
                                                         f" {self.timeout:g} s"})
                return
            same = isinstance(status, error.ProcessDone)
            self.log.info("order {order}'s comparator says {files} are {what}{output}",
                          order=order, files=" and ".join(argv[-2:]),
                          what="the same" if same else "not the same",
                          output="" if same else f" ({status}); its output ended with: "
                                                 f"{child.output()}")
            answer.callback({"same": same})

        def timedOut():
            # A comparator that exited, but left a child of its own holding
            # its output open, has answered; one still running is killed.
            if child.status is None:
                try:
                    child.transport.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass
            child.transport.loseConnection()
            decide(child.status)

        timer = self.reactor.callLater(self.timeout, timedOut)
        child.ended.addCallback(decide)
        return answer


def _refusal(failure):
    failure.trap(_Refused)
    return {"same": False, "error": failure.getErrorMessage()}


class _Comparator(protocol.ProcessProtocol):
    """One comparator running: its exit status and the tail of what it printed."""

    def __init__(self):
        self.tail = bytearray()
        self.status = None
        self.ended = defer.Deferred()

    def connectionMade(self):
        self.transport.closeStdin()

    def childDataReceived(self, fd, data):
        self.tail += data
        del self.tail[:-OUTPUT_KEPT]

    def output(self):
        return self.tail.decode("utf-8", "replace").strip() or "(nothing)"

    def processExited(self, reason):
        self.status = reason.value

    def processEnded(self, reason):
        self.status = reason.value
        self.ended.callback(reason.value)
