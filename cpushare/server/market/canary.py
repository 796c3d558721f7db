"""
Canaries: known-answer jobs the market runs on its sellers, at random,
to catch a seller that cheats only when it believes nobody checks.

For each seller online, after a random wait (exponential, of mean
C{every} seconds: a seller cannot tell when the next one comes), the
market boots a VM of its benchmark image on it (L{cpushare.server.market.cpubench}:
one core, 256 MB, when the seller has room) and types at its shell

    /cpushare/canary SEED MB

with a fresh random SEED.  The guest computes the SHA-256 of SEED, a
newline and MB MiB of zeros, and sends its hex digest and a newline as
the VM's result through the result port (cpushare-result), as any
buyer's job would.  The seller reports the result's sha256 (ResultReady);
the market knows what it must be (computed on its thread pool) and
records the canary in the table canaries:

- the right digest: the seller is paid for the VM's CPU seconds at its
  current price, from the market's own account (ledger kind grants),
  in one transaction of reference "canary:VM", and the result counts as
  validated (L{validation.record});
- a wrong digest, no result within C{timeout}, or a VM that ended without
  one (its seller disconnected, say): nothing is paid, the result counts
  as invalid (the seller's consecutive valid results go back to zero, its
  failed canaries up by one), and the market votes bad in its rating
  (L{cpushare.server.market.ratings.votes}).

Never two canaries at once on one seller, at most C{AT_ONCE} market-wide.
The seller can tell a canary from a buyer's VM only as it can tell the
benchmark: by the image's digest, which is the same for every canary.
"""

import hashlib
import random as random_
import secrets

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from cpushare.money import cpuCost, formatAmount
from cpushare.server.market import validation
from cpushare.server.market.cpubench import (
    CORES, SellerTurns, SystemRun, expectedDigest, roomFor)
from cpushare.server.market.orders import SETTLE_WAIT
from cpushare.server.market.ratings import votes
from cpushare.server.money import ledger

EVERY = 21600.0
MB = 16
TIMEOUT = 300.0
AT_ONCE = 2
# How often a canary looks whether its stopped VM's last CPU seconds came.
FINAL_CPU_POLL = 0.5


class AlreadyDecided(Exception):
    """A canary is decided once: a second decision (a replay) changes nothing."""


def resultDigest(seed, mb):
    """The sha256 of the result a right answer to a canary of C{seed} and C{mb} sends."""
    return hashlib.sha256((expectedDigest(seed, mb) + "\n").encode("ascii")).hexdigest()


def addCanary(cursor, vmId, sellerId, expected, started):
    cursor.execute(
        "INSERT INTO canaries (vm_id, seller_account_id, expected, started)"
        " VALUES (?, ?, ?, ?)", (vmId, sellerId, expected, started))


def decide(cursor, vmId, sellerId, reported, passed, amount, ended, why=None):
    """
    Record canary C{vmId}'s outcome, in one store transaction: what its
    seller C{sellerId} reported (or None), whether it C{passed}, C{amount}
    paid from the market's grants to the seller's earnings when it did,
    and the seller's validation.  Returns the seller's votes
    (L{ratings.votes}).  Raises L{AlreadyDecided} for a canary decided
    before: nothing is counted or paid twice.
    """
    cursor.execute("SELECT passed FROM canaries WHERE vm_id = ? AND seller_account_id = ?",
                   (vmId, sellerId))
    row = cursor.fetchone()
    if row is None or row[0] is not None:
        raise AlreadyDecided(f"canary {vmId} of seller {sellerId} is decided or unknown")
    paid = amount if passed else 0
    if paid > 0:
        ledger.post(cursor, "canary", f"canary VM {vmId} answered right",
                    [(ledger.GRANTS, None, -paid), (ledger.EARNINGS, sellerId, paid)],
                    reference=f"canary:{vmId}")
    cursor.execute(
        "UPDATE canaries SET reported = ?, passed = ?, paid = ?, ended = ? WHERE vm_id = ?",
        (reported, 1 if passed else 0, paid, ended, vmId))
    validation.record(cursor, sellerId, passed, canary=True, why=why)
    return votes(cursor, sellerId)


class Canaries(SellerTurns):
    """
    The canaries of the market's sellers.  C{bench} (a
    L{cpushare.server.market.cpubench.CPUBench}) has the image they boot;
    C{board} gives a seller's price (C{figures}) and is told its new
    votes (C{voted}) after a wrong answer; C{random} draws the waits and is
    the system's own unless a test gives one.
    """

    log = Logger()
    what = "canary"

    def __init__(self, reactor, store, orders, bench, board, every=EVERY, mb=MB,
                 timeout=TIMEOUT, random=None):
        SellerTurns.__init__(self, reactor, AT_ONCE)
        self.store = store
        self.orders = orders
        self.bench = bench
        self.board = board
        self.every = every
        self.mb = mb
        self.timeout = timeout
        self.random = random or random_.SystemRandom()

    @property
    def enabled(self):
        return bool(self.every) and self.bench.sha256 is not None

    def firstWait(self):
        return self.random.expovariate(1.0 / self.every)

    nextWait = firstWait

    async def run(self, session):
        """
        Run one canary on C{session}'s seller; returns whether it passed, or
        None when the seller had no room for it or the market stopped first.
        """
        name, sellerId = session.account.name, session.account.id
        seed = secrets.token_hex(16)
        expected = await deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                           resultDigest, seed, self.mb)
        if not session.connected or not roomFor(self.orders, session):
            self.log.info("canary on {name} put off: no room for it now", name=name)
            return None
        price = self.board.figures(session).price
        run = SystemRun(self.reactor, self.orders, self.timeout, self.what, name)
        bench = self.bench
        vm = await run.boot(session, bench.accountId, bench.sha256, bench.size)
        started = self.reactor.seconds()
        self.running[session] = vm
        reported = defer.Deferred()
        vm.resultObserver = lambda sha256, size: reported.callback(sha256)
        try:
            await self.store.run(addCanary, vm.id, sellerId, expected, started)
            answer = None
            if await run.typeLine(f"/cpushare/canary {seed} {self.mb}") is not None:
                answer = await run.until(reported, "no result")
            run.stop()
            ran = self.reactor.seconds() - started
            passed = answer == expected
            amount = 0
            if passed:
                # Its CPU seconds, as its seller says, capped at its time.
                cpu = min(await self._finalCPU(session, vm), ran * CORES)
                amount = cpuCost(price, cpu)
                why = None
            elif answer is None:
                why = f"the canary got no result: {run.why}"
            else:
                why = f"the canary's result was wrong: sha256 {answer}, not {expected}"
            if self.stopped:
                # Not the seller's doing: the canary is left undecided.
                self.log.info("canary VM {vm} on {name} left undecided: the market stops",
                              vm=vm.id, name=name)
                return None
            sellerVotes = await self.store.run(decide, vm.id, sellerId, answer, passed, amount,
                                               self.reactor.seconds(), why)
        finally:
            self.running.pop(session, None)
            run.stop()
        if passed:
            self.log.info("canary VM {vm} on {name} answered right; paid {amount}",
                          vm=vm.id, name=name, amount=formatAmount(amount))
        else:
            self.log.warn("canary VM {vm} on seller {name} failed: {why}", vm=vm.id,
                          name=name, why=why)
            self.board.voted(sellerId, sellerVotes)
        return passed

    async def _finalCPU(self, session, vm):
        """The stopped VM's CPU seconds, once its seller said its last word (or soon)."""
        deadline = self.reactor.seconds() + SETTLE_WAIT
        while vm.id in session.stopping and session.connected and not self.stopped \
                and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, FINAL_CPU_POLL)
        return vm.cpuSeconds
