"""
Verdicts of replicated runs: the replicas of a group compared, and money
and ratings following the outcome.

Each VM of a replica group ends with an outcome:

 - the digest its seller reported for its result (the last one, when a VM
   placed again reported on two leases);
 - NO_RESULT: it ended without one, as its seller reported (the guest
   powered off, QEMU failed, the VM could not start): a failed replica,
   which is a vote like a digest, so that replicas that all end without a
   result agree;
 - EXCUSED: the buyer or the market ended it (stopped, cancelled, out of
   funds) before it had a result: it is not judged.  Otherwise a buyer
   could stop one replica to have its seller found wrong and refunded.

When every replica of a group has an outcome the group is decided (see
L{judge}): the outcomes that are equal (or that the buyer's comparator
found the same) form classes; a class of more than half of the group is
accepted and the other judged replicas are rejected, their sellers rated
bad and not paid.  A group of two that disagree gets a third replica on a
third seller that differs from both, and the three decide.  No majority:
inconclusive, and everybody is paid, so a buyer whose guest writes random
results cannot get its CPU time for free.

A group that is not decided C{timeout} seconds after its first outcome is
decided with what is in: a replica still running is not judged.

An order replicated adaptively (--replicas auto) has groups of one VM;
when its VM is first placed the market draws whether to run it a second
time: always for a seller with fewer than C{threshold} consecutive valid
results, else with probability 1/n for one with n.  A group left at one
is never compared: its verdict is 'unchecked', which pays like accepted
and counts for nothing.

The leases of a replicated order keep their earnings pending until the
verdict (L{cpushare.server.money.escrow}); the lease that gave a VM's
outcome takes its VM's verdict, its other leases (on sellers that went
away before a result) are paid as inconclusive.
"""

from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger

from cpushare.protocol import commands
from cpushare.server.db import leases as leasesql
from cpushare.server.db import marketsql
from cpushare.server.market import validation
from cpushare.server.money import escrow

TIMEOUT = 86400.0
THRESHOLD = 10
# Digests compared with the buyer's comparator in a group, at most.
MAX_COMPARISONS = 10

NO_RESULT = "none"
EXCUSED = "excused"
MISSING = None

ACCEPTED = "accepted"
REJECTED = "rejected"
INCONCLUSIVE = "inconclusive"
UNCHECKED = "unchecked"
TIEBREAK = "tiebreak"
WAIT = "wait"


@dataclass
class Member:
    """One replica of a group: its VM, outcome, the lease that gave it and its seller."""

    vm: int
    outcome: str = MISSING
    lease: int = None
    seller: int = None


@dataclass
class Group:
    """A replica group of an order, until it is decided."""

    order: int
    number: int
    buyer: int
    compare: bool = False
    adaptive: bool = False
    sampled: bool = False           # adaptive: whether to run it again was drawn
    members: dict = field(default_factory=dict)     # vm id -> Member
    same: dict = field(default_factory=dict)        # (digest, digest) -> bool, compared
    timer: object = None
    deciding: bool = False
    adding: bool = False            # a replica is being added: wait for it
    decided: bool = False

    @property
    def key(self):
        return self.order, self.number


@dataclass(frozen=True)
class Judgement:
    """What L{judge} found: the verdict and the VMs accepted, rejected and not judged."""

    verdict: str
    accepted: frozenset = frozenset()
    rejected: frozenset = frozenset()
    unjudged: frozenset = frozenset()
    digest: str = None


def _classes(outcomes, same):
    """Lists of VM ids whose outcomes are equal or were found the same."""
    parent = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    digests = sorted({d for d in outcomes.values()})
    for a in digests:
        for b in digests:
            if a < b and same.get((a, b)):
                parent[find(b)] = find(a)
    classes = {}
    for vm in sorted(outcomes):
        classes.setdefault(find(outcomes[vm]), []).append(vm)
    return sorted(classes.values(), key=lambda c: (-len(c), c[0]))


def judge(members, same=None, final=False):
    """
    The L{Judgement} of a group: C{members} {vm id: outcome}; C{same}
    {(digest a, digest b): bool} with a < b, the comparator's answers;
    C{final} when its time is up (replicas without an outcome are not
    judged).
    """
    same = same or {}
    waiting = {vm for vm, o in members.items() if o is MISSING}
    if waiting and not final:
        return Judgement(WAIT)
    excused = {vm for vm, o in members.items() if o == EXCUSED}
    judged = {vm: o for vm, o in members.items() if vm not in waiting and vm not in excused}
    unjudged = frozenset(waiting | excused)
    if len(members) == 1:
        return Judgement(UNCHECKED, accepted=frozenset(judged), unjudged=unjudged)
    classes = _classes(judged, same)
    if classes and 2 * len(classes[0]) > len(members):
        top = classes[0]
        digest = judged[top[0]]
        return Judgement(ACCEPTED, accepted=frozenset(top),
                         rejected=frozenset(judged) - set(top), unjudged=unjudged,
                         digest=None if digest == NO_RESULT else digest)
    if len(members) == 2 and not final and not unjudged:
        return Judgement(TIEBREAK)
    return Judgement(INCONCLUSIVE, unjudged=frozenset(members))


def _pendingLeases(cursor, vmIds):
    return {vm: leasesql.pendingLeases(cursor, vm) for vm in vmIds}


def settle(cursor, group, judgement, decided, reason):
    """
    One store transaction: every pending lease of the group's VMs takes
    its verdict (money moves, L{escrow.decide}), the sellers of judged
    outcomes are counted (L{validation.record}), and the verdict is kept.
    Returns {seller account id: (its new L{validation.Validation}, its
    votes when they changed, else None)}.
    """
    changed = {}
    for vm, leases in _pendingLeases(cursor, list(group.members)).items():
        member = group.members[vm]
        for leaseId, sellerId, buyerId in leases:
            if leaseId != member.lease or vm in judgement.unjudged:
                verdict = UNCHECKED if judgement.verdict == UNCHECKED else INCONCLUSIVE
                escrow.decide(cursor, leaseId, verdict)
                continue
            if vm in judgement.rejected:
                escrow.decide(cursor, leaseId, REJECTED)
                changed[sellerId] = validation.recordAndVote(
                    cursor, sellerId, False, leaseId, buyerId,
                    why=f"its result of VM {vm} was in the minority of replica group"
                        f" {group.number} of order {group.order}")
            elif vm in judgement.accepted and judgement.verdict == ACCEPTED:
                escrow.decide(cursor, leaseId, ACCEPTED)
                changed[sellerId] = validation.recordAndVote(cursor, sellerId, True)
            else:
                escrow.decide(cursor, leaseId, judgement.verdict)
    marketsql.addVerdict(cursor, group.order, group.number, judgement.verdict,
                         judgement.digest, decided, reason)
    return changed


class Verdicts:
    """
    The replica groups not decided yet, and how they are decided.  C{orders}
    places tie-breaking replicas (C{addReplica(group)}), stops rejected ones
    (C{stopRejected(vmId, why)}) and finds a buyer's program
    (C{buyerSession(accountId)}); C{validated(sellerId, validation)} is told
    a seller's new counts and votes (L{validation.Validations.recorded}).
    """

    log = Logger()

    def __init__(self, reactor, store, orders, timeout=TIMEOUT, threshold=THRESHOLD,
                 random=None, validated=None):
        import random as random_
        self.reactor = reactor
        self.store = store
        self.orders = orders
        self.timeout = timeout
        self.threshold = threshold
        self.random = random or random_.SystemRandom()
        self.validated = validated or (lambda sellerId, counts, votes=None: None)
        self.groups = {}            # (order, number) -> Group

    def open(self, orderId, number, buyerId, vmIds, compare=False, adaptive=False):
        """A group of these VMs starts (or comes back after a restart)."""
        group = Group(orderId, number, buyerId, compare, adaptive)
        for vm in vmIds:
            group.members[vm] = Member(vm)
        self.groups[group.key] = group
        return group

    def groupOf(self, vm):
        return None if vm.group is None else self.groups.get((vm.order, vm.group))

    def leaseFor(self, vm):
        """The verdict a new lease of C{vm} opens with: pending while its group is undecided."""
        group = self.groupOf(vm)
        return None if group is None or group.decided else escrow.PENDING_VERDICT

    # -- adaptive replication

    def draw(self, consecutive):
        """Whether a VM placed on a seller with C{consecutive} valid results runs again."""
        if consecutive < self.threshold or consecutive <= 1:
            return True
        return self.random.random() < 1.0 / consecutive

    def drawsFor(self, vm):
        """Whether C{vm}'s first lease draws its second run (its seller's count is needed)."""
        group = self.groupOf(vm)
        return group is not None and group.adaptive and not group.sampled and \
            not group.decided

    def placed(self, vm, consecutive):
        """
        C{vm} got its first lease on a seller with C{consecutive} valid
        results: for an adaptive group, draw whether it runs a second time.
        """
        if not self.drawsFor(vm):
            return
        group = self.groupOf(vm)
        group.sampled = True
        again = self.draw(consecutive)
        self.log.info("VM {vm} (adaptive replication, seller with {n} consecutive valid"
                      " results): {what}", vm=vm.id, n=consecutive,
                      what="runs a second time" if again else "runs once")
        if again:
            group.adding = True
            self.orders.addReplica(group)

    # -- outcomes

    def outcome(self, vm, outcome, leaseId, sellerId):
        """
        C{vm} has an outcome: a digest, NO_RESULT or EXCUSED, given by lease
        C{leaseId} of seller C{sellerId}.  A VM's EXCUSED or NO_RESULT never
        replaces a digest it reported.
        """
        group = self.groupOf(vm)
        if group is None or group.decided or vm.id not in group.members:
            return
        member = group.members[vm.id]
        if outcome in (NO_RESULT, EXCUSED) and member.outcome not in (MISSING, EXCUSED,
                                                                       NO_RESULT):
            return
        member.outcome, member.lease, member.seller = outcome, leaseId, sellerId
        self.outcomeSeen(group)

    def outcomeSeen(self, group):
        """C{group} (brought back after a restart) has outcomes: its timeout runs."""
        if group.timer is None and self.timeout:
            group.timer = self.reactor.callLater(self.timeout, self._timedOut, group)
        self.consider(group)

    def stop(self):
        for group in self.groups.values():
            if group.timer is not None and group.timer.active():
                group.timer.cancel()
            group.timer = None

    def added(self, group, vmId):
        """A replica C{vmId} joined C{group}."""
        group.members[vmId] = Member(vmId)
        group.adding = False

    def consider(self, group, final=False):
        """Decide C{group} if it can be now."""
        if group.decided or group.deciding or group.adding:
            return
        outcomes = {vm: m.outcome for vm, m in group.members.items()}
        if not final and any(o is MISSING for o in outcomes.values()):
            return
        group.deciding = True
        d = defer.ensureDeferred(self._decide(group, final))
        d.addErrback(lambda f: self.log.failure(
            "deciding replica group {n} of order {order}", f, n=group.number,
            order=group.order))

        def done(_):
            group.deciding = False
        d.addBoth(done)

    def _timedOut(self, group):
        group.timer = None
        if not group.decided:
            self.log.info("replica group {n} of order {order}: no verdict in {t:.0f}s;"
                          " deciding with the results in", n=group.number, order=group.order,
                          t=self.timeout)
            self.consider(group, final=True)

    async def _compare(self, group):
        """Ask the buyer's comparator about each pair of differing digests not asked yet."""
        digests = {}
        for vm, m in sorted(group.members.items()):
            if m.outcome not in (MISSING, EXCUSED, NO_RESULT):
                digests.setdefault(m.outcome, vm)
        pairs = [(a, b) for a in sorted(digests) for b in sorted(digests)
                 if a < b and (a, b) not in group.same][:MAX_COMPARISONS]
        for a, b in pairs:
            buyer = self.orders.buyerSession(group.buyer)
            if buyer is None or not buyer.connected:
                self.log.info("replica group {n} of order {order}: the buyer's program is"
                              " not connected to compare results", n=group.number,
                              order=group.order)
                return
            try:
                answer = await buyer.control.callRemote(
                    commands.CompareResults, order=group.order, a=digests[a], b=digests[b])
            except Exception as e:
                self.log.warn("comparing results of VMs {a} and {b}: {why}", a=digests[a],
                              b=digests[b], why=str(e))
                group.same[(a, b)] = False
                continue
            if answer.get("error"):
                self.log.info("the buyer's comparator on VMs {a} and {b}: {why}",
                              a=digests[a], b=digests[b], why=answer["error"])
            group.same[(a, b)] = bool(answer["same"]) and not answer.get("error")

    async def _decide(self, group, final):
        if group.compare:
            await self._compare(group)
        outcomes = {vm: m.outcome for vm, m in group.members.items()}
        judgement = judge(outcomes, group.same, final)
        if judgement.verdict == WAIT:
            return
        if judgement.verdict == TIEBREAK:
            self.log.info("replica group {n} of order {order}: the two results differ;"
                          " a third replica breaks the tie", n=group.number, order=group.order)
            group.adding = True
            self.orders.addReplica(group)
            return
        reason = self._reason(group, judgement, final)
        group.decided = True
        if group.timer is not None and group.timer.active():
            group.timer.cancel()
        group.timer = None
        changed = await self.store.run(settle, group, judgement, self.reactor.seconds(),
                                       reason)
        self.groups.pop(group.key, None)
        self.log.info("replica group {n} of order {order}: {verdict} ({reason})",
                      n=group.number, order=group.order, verdict=judgement.verdict,
                      reason=reason)
        for sellerId, (counts, votes) in changed.items():
            self.validated(sellerId, counts, votes)
        for vm in sorted(judgement.rejected):
            self.orders.stopRejected(vm, f"its result was in the minority of replica group"
                                         f" {group.number}: {reason}")
        self.orders.groupDecided(group)

    @staticmethod
    def _reason(group, judgement, final):
        n = len(group.members)
        if judgement.verdict == UNCHECKED:
            return "run once (adaptive replication): not compared"
        if judgement.verdict == ACCEPTED:
            what = "no result" if judgement.digest is None else f"sha256 {judgement.digest}"
            text = f"{len(judgement.accepted)} of {n} replicas agree on {what}"
            if judgement.rejected:
                text += f"; VMs {', '.join(map(str, sorted(judgement.rejected)))} differ"
            return text
        text = f"no majority among {n} replicas"
        if final:
            text += " when the verdict timeout passed"
        return text
