"""
Orders and the VMs that run them, on the server.

A buy order asks for N VMs of C cores and M MB booting one of the buyer's
images, on sellers that pass its screens (L{cpushare.server.market.screens}).
Each VM is placed on the best seller that passes and has room for it: the
cheapest, then the best rated, then the nearest (L{cpushare.server.market.board}).
VMs that find none wait, with the reason, and are placed as soon as
capacity that passes appears: a seller coming online, changing its terms,
or a VM ending.  Matching runs on the reactor thread only, so two VMs can
never be given the same capacity.

Each stay of a VM on a seller is a lease, recorded with the terms it was
placed at; a VM placed again elsewhere starts a new lease.  A VM is never
placed on a seller of its own buyer's account.  A lease is billed from
the moment its VM shows life: the first frame its NIC delivers to the
buyer's network, or the first output on its console.  Its NIC's link
carries only the traffic the funds held for the lease can pay for
(L{cpushare.server.money.billing.netLimit}); past that it is billed at once and
its hold topped up, or, when the buyer's funds or budget cannot, stopped.  A VM is only
started once its lease holds the buyer's funds for a window ahead
(L{cpushare.server.money.billing}); a buyer whose funds cannot hold it has its
VMs wait until funds are added, and a VM whose funds run out is stopped.  A placed VM is started on its
seller with StartVM; its NIC channel on the seller's connection is linked
to the same channel on the buyer's `cpushare-buyer` connection, so its
frames reach only the buyer's own network.

A seller that disconnects keeps its VMs running; the server marks them
detached and gives the seller GRACE seconds to come back and reattach them
(ReattachVMs).  Past that they are lost and placed again elsewhere.  The
same holds across a server restart: active VMs are loaded from the database
as detached.

An order with replicas runs each VM K times, a replica group: a VM of a
group is placed only on a seller that differs from those of its group's
other placed VMs as the order asks (L{cpushare.server.market.replicas});
when none does, it waits and its reason names the condition that is short.
A dry run places and holds nothing: it says where the VMs would go and
what the market would hold for them.
"""

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from cpushare.money import MAX_AMOUNT, formatAmount
from cpushare.protocol import commands, paging
from cpushare.protocol.commands import BadRequest, NoSuchVM, consoleChannel, nicChannel
from cpushare.protocol.states import (
    OVER, REPORTED, IllegalTransition, OrderState, VMLife, VMState, check as checkTransition)
from cpushare.server.money import billing as billing_
from cpushare.server.db import leases as leasesql
from cpushare.server.db import marketsql
from cpushare.server.db import store
from cpushare.server.market.cpubench import SYSTEM_ACCOUNT
from cpushare.server.market import replicas as replicas_
from cpushare.server.market import validation
from cpushare.server.market import verdicts as verdicts_
from cpushare.server.market.replicas import Mark, conflict, markOf
from cpushare.server.market.screens import Screens

GRACE = 600.0
# Seconds to wait for a stopped VM's last CPU seconds before settling its lease.
SETTLE_WAIT = 15.0
MAX_VMS_PER_ORDER = 1000
MAX_VM_CORES = 256
MAX_VM_MEMORY = 1024 * 1024
CONSOLE_HISTORY = 4096
# Lines of a VM's console the web site shows, by default and at most.
CONSOLE_TAIL = 40
MAX_CONSOLE_TAIL = 500
# A VM whose traffic spent its network allowance is billed at once and its
# hold topped up; it stops when that gives it fewer bytes than this.
MIN_NET_ALLOWANCE = 10**6
# The most result bytes one of the market's own VMs (a canary) may send.
SYSTEM_RESULT_MAX = 4096


class VM(VMLife):
    def __init__(self, vmId, orderId, buyerId, buyerName, image, size, cores, memory, mac,
                 screens=Screens(), budget=None, state=VMState.PENDING):
        VMLife.__init__(self, state)
        self.id = vmId
        self.order = orderId
        self.buyerId = buyerId
        self.buyerName = buyerName
        self.image = image
        self.size = size
        self.cores = cores
        self.memory = memory
        self.mac = mac
        self.screens = screens
        self.budget = budget
        self.leaseId = None         # the lease it runs under, once funded
        self.link = None            # the relay link of its NIC to the buyer
        self.netBase = 0            # bytes of its earlier links, this lease
        self.netDirect = 0          # bytes it carried directly to other sellers, this lease
        self.aliveAt = None         # when it showed life, this lease (billing starts)
        self.lifeWatch = None       # called on its first sign of life, then None
        self.netLimit = None        # total bytes its lease may carry; None: no limit
        self.netFee = 0             # its lease's fee a GB
        self.reason = None
        self.seller = None
        self.sellerAccountId = None
        self.started = None
        self.cpuSeconds = 0.0
        self.ip = None
        self.graceCall = None
        self.buyerSession = None
        self.consoleHistory = b""
        self.consoles = set()
        self.consoleObserver = None     # the market's own VMs: it reads their console
        self.resultObserver = None      # and takes their result: (sha256, size)
        self.system = False
        self.endWaiters = []            # Deferreds fired with (state, reason) when it ends
        self.group = None               # its replica group in its order, or None
        self.replicas = 1               # the VMs of its replica group
        self.diversity = frozenset()    # what the sellers of its group must differ in
        self.mark = None                # its seller, as diversity compares it, once placed
        self.resultLease = None         # the lease whose seller reported its result
        self.resultSent = (None, 0)     # (lease, bytes of its result the buyer took)

    def consoleReceived(self, data):
        """Console output from the seller: kept (the last CONSOLE_HISTORY bytes) and sent on."""
        if self.lifeWatch is not None:
            watch, self.lifeWatch = self.lifeWatch, None
            watch()
        self.consoleHistory = (self.consoleHistory + data)[-CONSOLE_HISTORY:]
        if self.consoleObserver is not None:
            self.consoleObserver(data)
        channel = consoleChannel(self.id)
        for session in self.consoles:
            session.sendFrame(channel, data)

    def consoleInput(self, data):
        if self.seller is not None:
            self.seller.sendFrame(consoleChannel(self.id), data)

    def netBytes(self):
        """Bytes its NIC exchanged with the buyer's network during this lease."""
        link = self.link
        current = 0 if link is None else link.bytesAB + link.bytesBA
        return self.netBase + current + self.netDirect

    def foldLink(self):
        """The current link ends: keep its count."""
        if self.link is not None:
            self.netBase += self.link.bytesAB + self.link.bytesBA
            self.link = None

    @property
    def active(self):
        return self.state not in OVER


class PlacedVMs(dict):
    """
    A seller's VMs by id, keeping the cores and memory they use summed:
    change it with C{placed[vmId] = vm} and C{placed.pop(vmId)} only.
    """

    def __init__(self):
        dict.__init__(self)
        self.cores = self.memory = 0

    def __setitem__(self, vmId, vm):
        self.pop(vmId, None)
        dict.__setitem__(self, vmId, vm)
        self.cores += vm.cores
        self.memory += vm.memory

    def pop(self, vmId, *default):
        if vmId in self:
            vm = dict.pop(self, vmId)
            self.cores -= vm.cores
            self.memory -= vm.memory
            return vm
        if default:
            return default[0]
        raise KeyError(vmId)


@implementer(billing_.ILeases)
class Orders:
    """
    The orders and their VMs.  It asks the board where a VM may go, the
    relay to link a VM's NIC to its buyer, billing to hold, bill and settle
    leases (which reports back through L{billing_.ILeases}), and
    C{buyerSession(accountId)} for a buyer's program; C{images} (with
    C{readChunk}) serves the sellers the images they boot.
    """

    log = Logger()

    def __init__(self, reactor, store, relay, board, billing, buyerSession, images=None,
                 grace=GRACE):
        self.reactor = reactor
        self.db = store
        self.relay = relay
        self.board = board
        self.billing = billing
        self.paths = None           # direct paths between sellers (market/paths.py)
        self.buyerSession = buyerSession
        self.images = images
        self.grace = grace
        self.vms = {}
        self.unfunded = {}          # buyer id -> why its VMs cannot be funded now
        self.settling = {}          # vm id -> (lease id, call): waiting for final CPU time
        self.groups = {}            # (order id, replica group) -> {active VMs}
        # The market runs its CPU benchmark: a seller without a score yet
        # takes no replica that must run on a different CPU.
        self.measuresCPU = False
        self.verdicts = verdicts_.Verdicts(reactor, store, self)
        # Trusted leases are admitted and watched by the market's
        # L{cpushare.server.market.attestation.Attestations}, when it has one.
        self.attestations = None

    # -- loading

    async def load(self):
        """Bring back the VMs that were active when the server stopped."""
        rows = await self.db.run(store.activeVMs)
        orders = await self.db.run(marketsql.orderScreens, {row[1] for row in rows})
        leases = await self.db.run(leasesql.openLeases)
        leaseStates = await self.db.run(billing_.openLeaseStates, self.billing.interval)
        groups = await self.db.run(marketsql.activeReplicaGroups)
        for (vmId, orderId, sellerId, mac, state, started, cpu, ip, buyerId, image,
             cores, memory, size, buyerName, sellerName) in rows:
            screens, budget = orders.get(orderId, ({}, None))
            vm = VM(vmId, orderId, buyerId, buyerName, image, size, cores, memory, mac,
                    Screens.fromArguments(**screens), budget,
                    VMState.PENDING if sellerId is None else VMState(state))
            vm.started, vm.cpuSeconds, vm.ip = started, cpu, ip
            vm.sellerAccountId = sellerId
            if buyerName == SYSTEM_ACCOUNT:
                # A CPU benchmark the restart interrupted: its seller stops
                # it when it reconnects (the market does not keep it).
                self._save(lambda c, vmId=vmId: store.updateVM(
                    c, vmId, state=VMState.STOPPED, reason="the market server restarted"))
                continue
            self.vms[vmId] = vm
            if vmId in groups:
                group, k, diversity = groups[vmId]
                # Only its seller's account is known again: the rest of
                # what diversity compares is not.
                self._join(vm, group, k, diversity,
                           None if sellerId is None else Mark(account=sellerId))
            if sellerId is not None:
                vm.leaseId = leases.get(vmId)
                if vm.leaseId is not None and vm.leaseId in leaseStates:
                    vm.aliveAt, vm.netLimit, vm.netBase, vm.netFee = leaseStates[vm.leaseId]
                    if vm.aliveAt is None:
                        vm.lifeWatch = lambda vm=vm: self._showedLife(vm)
                self._detach(vm, "the market server restarted")
        await self.billing.settleLeftovers(
            {vm.leaseId for vm in self.vms.values() if vm.leaseId is not None})
        await self._loadGroups()
        pending = [vm for vm in self.vms.values() if vm.state == VMState.PENDING]
        if rows:
            self.log.info("loaded {n} active VMs ({p} waiting for capacity)",
                          n=len(rows), p=len(pending))

    async def _loadGroups(self):
        """
        Bring back the replica groups not decided yet.  A VM that ended
        without a result while the server was away is not judged: whether
        its seller or its buyer ended it is not known.
        """
        groups = {}
        for (orderId, number, buyerId, compare, adaptive, vmId, state, resultLease, sha256,
             leased) in await self.db.run(marketsql.undecidedGroups):
            key = (orderId, number)
            if key not in groups:
                groups[key] = self.verdicts.open(orderId, number, buyerId, [], bool(compare),
                                                 bool(adaptive))
            group = groups[key]
            group.sampled = group.sampled or leased > 0
            self.verdicts.added(group, vmId)
            member = group.members[vmId]
            if sha256 is not None:
                member.outcome, member.lease = sha256, resultLease
            elif state in OVER:
                member.outcome = verdicts_.EXCUSED
        for group in groups.values():
            for vm in self.vms.values():
                if (vm.order, vm.group) == group.key:
                    vm.replicas = len(group.members)
            if any(m.outcome is not verdicts_.MISSING for m in group.members.values()):
                self.verdicts.outcomeSeen(group)

    def stop(self):
        """The server is stopping: VMs stay as they are in the database."""
        self.verdicts.stop()
        for vm in self.vms.values():
            if vm.graceCall is not None and vm.graceCall.active():
                vm.graceCall.cancel()
            vm.graceCall = None
        for leaseId, call in self.settling.values():
            if call.active():
                call.cancel()
        self.settling.clear()

    # -- buyers

    async def place(self, account, image, count, cores, memory, screens=Screens(),
                    budget=None, replicas=None, diverse=None, dryRun=False, explain=False,
                    adaptive=False, compare=False):
        """
        Place an order of C{count} VMs, each run C{replicas} times when
        given (on sellers that differ in C{diverse}); with C{dryRun} only
        say where they would go and what would be held.  An encrypted
        image (one whose key the market holds) is run only by a trusted
        order (C{screens.trusted}): its key is released to attested sellers
        alone.
        """
        trusted = screens.trusted
        if adaptive and replicas is not None:
            raise BadRequest("--replicas auto replaces a number of replicas: give one or the"
                             " other")
        k, diversity = replicas_.checkReplicas(2 if adaptive else replicas, diverse)
        if compare and k == 1:
            raise BadRequest("a comparator compares replicas: give --replicas too")
        if budget is not None and not 0 < budget <= MAX_AMOUNT:
            raise BadRequest(f"a budget is above 0 and at most {formatAmount(MAX_AMOUNT)}")
        if not 1 <= count <= MAX_VMS_PER_ORDER:
            raise BadRequest(f"an order is for 1 to {MAX_VMS_PER_ORDER} VMs, not {count}")
        if not 1 <= cores <= MAX_VM_CORES:
            raise BadRequest(f"a VM has 1 to {MAX_VM_CORES} cores, not {cores}")
        if not 64 <= memory <= MAX_VM_MEMORY:
            raise BadRequest(f"a VM has 64 to {MAX_VM_MEMORY} MB of memory, not {memory}")
        if count * k > MAX_VMS_PER_ORDER:
            raise BadRequest(f"an order is for at most {MAX_VMS_PER_ORDER} VMs in all, not"
                             f" {count * k} VMs ({count} VMs x {k} replicas)")

        def imageSize(cursor):
            size = store.imageSize(cursor, account.id, image)
            if size is None:
                raise BadRequest(
                    f"this account has no image {image!r}:"
                    " upload it with 'cpushare image upload'")
            if not trusted and store.imageKey(cursor, account.id, image) is not None:
                raise BadRequest(
                    f"image {image} is encrypted: its key is released only to attested"
                    " sellers, so order it with --trusted")
            return size

        if dryRun:
            size = await self.db.run(imageSize)
            return self._dryRun(VM(0, 0, account.id, account.name, image, size, cores,
                                   memory, "", screens, budget), count, k, diversity, explain)
        if adaptive:
            k = 1               # a second replica is drawn as each VM is placed

        def create(cursor):
            size = imageSize(cursor)
            orderId, ids = store.createOrder(
                cursor, account.id, image, count * k, cores, memory)
            marketsql.setOrderScreens(cursor, orderId, screens.toArguments(), budget)
            if k > 1 or adaptive:
                marketsql.setReplicas(cursor, orderId, k, replicas_.ordered(diversity),
                                      {vmId: 1 + i // k for i, vmId in enumerate(ids)})
                marketsql.setVerdictFlags(cursor, orderId, compare, adaptive)
            return size, orderId, ids

        size, orderId, ids = await self.db.run(create)
        allocated = 0
        reasons = {}                # replica group (None: none) -> why its VMs wait
        if k > 1 or adaptive:
            for number in range(1, count + 1):
                self.verdicts.open(orderId, number, account.id, ids[(number - 1) * k:number * k],
                                   compare, adaptive)
        for i, vmId in enumerate(ids):
            vm = VM(vmId, orderId, account.id, account.name, image, size,
                    cores, memory, store.macFor(vmId), screens, budget)
            self.vms[vmId] = vm
            if k > 1 or adaptive:
                self._join(vm, 1 + i // k, k, diversity)
            if self._allocate(vm):
                allocated += 1
            else:
                if vm.group not in reasons:
                    reasons[vm.group] = self.whyWaiting(vm)
                vm.reason = reasons[vm.group]
        self.log.info(
            "order {order} by {buyer}: {n} VMs of {cores} cores/{memory} MB, {a} placed",
            order=orderId, buyer=account.name, n=count * k, cores=cores, memory=memory,
            a=allocated)
        result = {"order": orderId, "vm_ids": ids, "allocated": allocated}
        return self._waiting(result, list(reasons.values()), explain)

    @staticmethod
    def _waiting(result, reasons, explain):
        """C{result} with why VMs wait: the first reason, and all with C{explain}."""
        if reasons:
            result["waiting"] = reasons[0]
        if explain:
            result["explain"] = reasons[:commands.PLAN_PAGE]
        return result

    def _dryRun(self, vm, count, k, diversity, explain):
        """
        Where C{count} VMs like C{vm}, each run C{k} times, would be placed
        now, and what the market would hold for them: their first window
        at their sellers' terms.  Nothing is placed or held.
        """
        taken = {}                  # seller session -> (cores, memory) this plan gives it
        plan, hold, reasons, premium = [], 0, [], 0
        for group in range(1, count + 1):
            if k > 1:
                vm.group, vm.replicas, vm.diversity = group, k, diversity
            marks = [] if k > 1 else None
            for _ in range(k):
                found = self._choose(vm, marks, taken)
                if found is None:
                    if len(reasons) < commands.PLAN_PAGE:
                        reasons.append(self.whyWaiting(vm, marks, taken))
                    break
                seller, figures, mark = found
                cores, memory = taken.get(seller, (0, 0))
                taken[seller] = (cores + vm.cores, memory + vm.memory)
                if marks is not None:
                    marks.append(mark)
                amount = billing_.windowCost(figures.price, figures.netFee, vm.cores,
                                             self.billing.window)
                hold += amount
                if vm.screens.trusted:
                    premium += (figures.price - self.board.figures(seller).price) * vm.cores
                plan.append({"group": group, "seller": figures.name, "country": figures.country,
                             "price": figures.price, "hold": amount})
            if k == 1 and found is None:
                break               # the VMs left are alike: none would be placed either
        result = {"order": 0, "vm_ids": [], "allocated": len(plan), "hold": hold,
                  **({"premium": premium} if vm.screens.trusted else {}),
                  "plan": [{key: value for key, value in entry.items() if value is not None}
                           for entry in plan[:commands.PLAN_PAGE]]}
        return self._waiting(result, reasons, explain)

    def outlook(self, account, screens, replicas=None, diverse=None):
        """
        Whether a replica group of C{replicas} one-core VMs of C{account}'s
        could be placed now on sellers that differ in C{diverse}, or which
        condition is short, in one line.
        """
        k, diversity = replicas_.checkReplicas(replicas, diverse)
        vm = VM(0, 0, account.id, account.name, "", 0, 1, 64, "", screens)
        short = replicas_.shortfall(diversity, k, [], self._candidates(vm), self.measuresCPU)
        if short is None:
            return (f"{k} replicas can be placed now on sellers that differ in"
                    f" {replicas_.describe(diversity)}")
        return short

    def _join(self, vm, group, k, diversity, mark=None):
        """C{vm} is a replica of group C{group} of its order, of C{k}, differing in C{diversity}."""
        vm.group, vm.replicas, vm.diversity, vm.mark = group, k, frozenset(diversity), mark
        self.groups.setdefault((vm.order, group), set()).add(vm)

    def _leave(self, vm):
        """
        C{vm} ended: its group's other replicas no longer compare with it,
        once the group is decided (until then a replica that ended still
        keeps the next ones, a tie-break's, off its seller).
        """
        if vm.group is None or self.verdicts.groupOf(vm) is not None:
            return
        key = (vm.order, vm.group)
        members = self.groups.get(key)
        if members is not None:
            members.discard(vm)
            if not members:
                del self.groups[key]

    def _siblingMarks(self, vm):
        """The marks of the sellers of C{vm}'s group's other placed VMs; None for no replica."""
        if vm.group is None:
            return None
        return [other.mark for other in self.groups.get((vm.order, vm.group), ())
                if other is not vm and other.mark is not None]

    def _candidates(self, vm, taken=None):
        """The marks of the sellers that pass C{vm}'s screens and have room for it, best first."""
        return [markOf(seller, figures) for seller, figures in self._open(vm, taken)]

    def whyWaiting(self, vm, others=None, taken=None):
        """
        Why no seller online can take C{vm} now, in one line; for a
        replica, the condition of its group that is short (C{others}: the
        marks of its group's placed VMs, its siblings' when None).
        """
        if vm.group is None:
            return self._whyNoSeller(vm)
        if others is None:
            others = self._siblingMarks(vm)
        candidates = self._candidates(vm, taken)
        if candidates or others:
            short = replicas_.shortfall(vm.diversity, vm.replicas, others, candidates,
                                        self.measuresCPU)
            if short is not None:
                return f"replica group {vm.group}: {short}; waiting for sellers that do"
        return f"replica group {vm.group}: {self._whyNoSeller(vm)}"

    def _whyNoSeller(self, vm):
        """Why no seller online passes C{vm}'s screens with room for it, in one line."""
        passing, excluded = self.board.explain(vm.screens, vm.buyerId, vm.cores)
        if not passing and not excluded:
            return "no seller is online; waiting for one"
        if passing:
            return (f"the {len(passing)} sellers that pass the screens have no room for"
                    f" {vm.cores} cores and {vm.memory} MB; waiting for capacity")
        counts = {}
        for _, _, reason in excluded:
            counts[reason.screen] = counts.get(reason.screen, 0) + 1
        detail = ", ".join(f"{n} by {key}" for key, n in sorted(counts.items()))
        return (f"none of the {len(excluded)} sellers online passes the screens"
                f" ({detail}); waiting for one that does")

    def owned(self, account, vmId):
        vm = self.vms.get(vmId)
        if vm is None or vm.buyerId != account.id:
            raise NoSuchVM(f"you have no VM {vmId}")
        return vm

    def stopVM(self, account, vmId):
        vm = self.vms.get(vmId)
        if vm is None or vm.buyerId != account.id or not vm.active:
            raise NoSuchVM(f"you have no running VM {vmId}")
        self._end(vm, VMState.STOPPED, "stopped by the buyer")

    async def cancel(self, account, orderId):
        if await self.db.run(store.orderAccount, orderId) != account.id:
            raise BadRequest(f"you have no order {orderId}")
        vms = [vm for vm in self.vms.values()
               if vm.order == orderId and vm.buyerId == account.id and vm.active]
        # End them all before the freed capacity is offered to waiting VMs,
        # or a waiting VM of this very order would take it.
        for vm in vms:
            self._end(vm, VMState.STOPPED, "the order was cancelled", refill=False)
        self.capacityChanged()
        self._save(lambda c: store.closeOrder(c, orderId, OrderState.CANCELLED))
        return len(vms)

    def attachConsole(self, session, vmId):
        """
        Join C{session} to the VM's serial console: it gets the recent
        output at once, then what follows; what it sends is typed in.
        """
        vm = self.owned(session.account, vmId)
        if not vm.active:
            raise NoSuchVM(f"VM {vmId} is {vm.state}: {vm.reason}")
        channel = consoleChannel(vmId)
        if channel in session.links:
            raise BadRequest(f"channel {channel} of this connection is in use")
        vm.consoles.add(session)
        session.route(channel, vm.consoleInput)
        if vm.consoleHistory:
            session.sendFrame(channel, vm.consoleHistory)
        return channel

    def consoleTail(self, account, vmId, lines=CONSOLE_TAIL):
        """
        The last C{lines} lines of C{account}'s VM's console (what the market
        keeps: its last CONSOLE_HISTORY bytes), as text, bytes that are not
        UTF-8 replaced; the first line may be cut.
        """
        if isinstance(lines, bool) or not isinstance(lines, int) \
                or not 1 <= lines <= MAX_CONSOLE_TAIL:
            raise BadRequest(f"lines must be a whole number from 1 to {MAX_CONSOLE_TAIL},"
                             f" not {lines!r}")
        vm = self.owned(account, vmId)
        text = vm.consoleHistory.decode("utf-8", errors="replace")
        return text.splitlines()[-lines:]

    def buyerConnected(self, session):
        """A buyer program connected: its VMs' NICs now reach it."""
        for vm in self.vms.values():
            if vm.buyerId == session.account.id and vm.seller is not None and vm.active \
                    and vm.leaseId is not None:
                self._linkBuyer(vm, session)

    def vmAddress(self, account, vmId, ip):
        vm = self.owned(account, vmId)
        vm.ip = ip
        self._save(lambda c: store.updateVM(c, vmId, ip=ip))

    # -- sellers

    def capacityChanged(self):
        """Capacity appeared or terms changed: place the VMs that wait, oldest first."""
        for vm in sorted(self.vms.values(), key=lambda v: v.id):
            if vm.state == VMState.PENDING:
                self._allocate(vm)

    def used(self, seller):
        """(cores, memory) of the VMs placed on C{seller}."""
        return seller.vms.cores, seller.vms.memory

    def _allocate(self, vm):
        if vm.buyerId in self.unfunded:
            vm.reason = self.unfunded[vm.buyerId]
            return False
        found = self._choose(vm, self._siblingMarks(vm))
        if found is None:
            return False
        # Marked before it is placed: placing it may place its group's next.
        vm.mark = found[2]
        if not self._place(vm, found[0], found[1]):
            vm.mark = None
            return False
        return True

    def _open(self, vm, taken=None):
        """
        The sellers online that pass C{vm}'s screens and have room for it
        beyond what C{taken} ({session: (cores, memory)}) gives them, best
        first: (session, figures).
        """
        board = self.board
        for seller, figures in board.ranked(vm.cores, vm.screens.traffic, vm.screens.trusted):
            if not seller.connected or seller.offer is None:
                continue
            cores, memory = self.used(seller)
            if taken and seller in taken:
                cores, memory = cores + taken[seller][0], memory + taken[seller][1]
            # Never on the buyer's own account (self-dealing), nor above the ceiling.
            if cores + vm.cores <= seller.offer["cores"] and \
                    memory + vm.memory <= seller.offer["memory"] and \
                    board.exclusion(seller, figures, vm.screens, vm.buyerId) is None:
                yield seller, figures

    def _choose(self, vm, others, taken=None):
        """
        The best seller for C{vm}: (session, figures, mark), or None.  For a
        replica (C{others}: the marks of its group's placed VMs) one that
        differs from them as its order asks.
        """
        for seller, figures in self._open(vm, taken):
            if others is None:
                return seller, figures, None
            mark = markOf(seller, figures)
            if conflict(vm.diversity, mark, others, self.measuresCPU) is None:
                return seller, figures, mark
        return None

    def _bindSeller(self, vm, seller):
        vm.seller = seller
        seller.vms[vm.id] = vm
        seller.route(consoleChannel(vm.id), vm.consoleReceived)

    def _place(self, vm, seller, figures):
        """
        Give C{vm} the capacity on C{seller} now (so nothing else takes it),
        hold the buyer's funds for its lease, then start it.  False if
        the table refuses the move (logged; nothing changes).
        """
        if not self._move(vm, VMState.ALLOCATED):
            return False
        self._bindSeller(vm, seller)
        vm.sellerAccountId = seller.account.id
        vm.reason = None
        vm.netBase = vm.netDirect = 0
        vm.aliveAt = None
        vm.lifeWatch = None
        vm.netLimit = None
        vm.netFee = figures.netFee
        self.log.info("VM {vm} of {buyer} placed on seller {seller} (session {session})",
                      vm=vm.id, buyer=vm.buyerName, seller=seller.account.name,
                      session=seller.sessionId)
        defer.ensureDeferred(self._fund(vm, seller, figures)).addErrback(
            lambda f: self.log.failure("starting VM {vm}", f, vm=vm.id))
        return True

    async def _fund(self, vm, seller, figures):
        billing = self.billing
        placed = self.reactor.seconds()
        # Only an adaptive group's first lease needs its seller's count.
        draws = self.verdicts.drawsFor(vm)
        trusted = {} if not vm.screens.trusted or self.attestations is None else {
            "trusted": True, "commissionPpm": self.attestations.commissionPpm}

        def save(cursor):
            store.updateVM(cursor, vm.id, seller_account_id=vm.sellerAccountId,
                           state=VMState.ALLOCATED, reason=None)
            leaseId = billing_.openLease(
                cursor, vm.id, vm.order, vm.buyerId, vm.sellerAccountId, figures.name,
                figures.price, figures.netFee, vm.cores, placed, billing.interval,
                billing.window, self.verdicts.leaseFor(vm), **trusted)
            consecutive = validation.validationOf(
                cursor, vm.sellerAccountId).consecutive if draws else 0
            return leaseId, billing_.leaseNetLimit(cursor, leaseId, billing.interval), \
                consecutive

        try:
            leaseId, netLimit, consecutive = await self.db.run(save)
        except billing_.CannotFund as e:
            self._unfunded(vm, seller, str(e))
            return
        if vm.seller is not seller or not vm.active:
            # It ended (cancelled, its seller went) while the hold was made.
            await self.billing.settle(leaseId, 0.0, 0, vm.reason or "ended")
            return
        vm.leaseId = leaseId
        vm.netLimit = netLimit
        if trusted:
            # Its seller's TPM must attest it before it starts.
            why = await self.attestations.admit(vm, seller, leaseId)
            if vm.seller is not seller or not vm.active or vm.leaseId != leaseId:
                return              # it ended meanwhile, its lease with it
            if why is not None:
                self._notAdmitted(vm, seller, why)
                return
        vm.lifeWatch = lambda: self._showedLife(vm)
        if draws:
            self.verdicts.placed(vm, consecutive)
        buyer = self.buyerSession(vm.buyerId)
        if buyer is not None:
            self._linkBuyer(vm, buyer)
        if self.paths is not None:
            self.paths.joined(vm, seller)
        d = seller.control.callRemote(
            commands.StartVM, vm=vm.id, image=vm.image, size=vm.size,
            cores=vm.cores, memory=vm.memory, mac=vm.mac)
        d.addErrback(self._startFailed, vm, seller)

    def _notAdmitted(self, vm, seller, why):
        """
        C{vm}'s seller failed the attestation of its trusted lease: the
        lease ends, nothing charged, and the VM waits for an attested seller.
        """
        self.log.info("VM {vm} of {buyer} not started on {seller}: {why}", vm=vm.id,
                      buyer=vm.buyerName, seller=seller.account.name, why=why)
        self._endLease(vm, why, waitForSeller=False)
        self._unplace(vm, seller, f"seller {seller.account.name} was {why}; waiting for an"
                      " attested seller")

    def attestationFailed(self, vm, why):
        """
        A trusted lease's re-attestation failed: its VM stops (fail closed);
        its bills stop at its last good quote (L{billing_.bill}).
        """
        if vm.active:
            self._end(vm, VMState.STOPPED, why)

    def _unfunded(self, vm, seller, why):
        """The buyer cannot pay for C{vm}: it waits, and so do its other VMs."""
        self.log.info("VM {vm} of {buyer} waits: {why}", vm=vm.id, buyer=vm.buyerName, why=why)
        self.unfunded[vm.buyerId] = why
        self._unplace(vm, seller, why)

    def _unplace(self, vm, seller, reason):
        """C{vm} leaves C{seller}, where it did not start, and waits for capacity: C{reason}."""
        if vm.seller is seller:
            seller.vms.pop(vm.id, None)
            seller.unroute(consoleChannel(vm.id))
            vm.seller = None
            self._leftSeller(vm)
        vm.sellerAccountId = None
        vm.mark = None
        if vm.active and self._move(vm, VMState.PENDING):
            vm.reason = reason
            self._save(lambda c: store.updateVM(c, vm.id, state=VMState.PENDING,
                                                seller_account_id=None, reason=reason))
        self.capacityChanged()

    async def systemVM(self, seller, accountId, image, size, cores, memory, onConsole):
        """
        Start one of the market's own VMs (a CPU benchmark) on C{seller}: not
        matched, not billed, its console read by C{onConsole}, its network
        linked to nothing.
        """
        orderId, [vmId] = await self.db.run(
            store.createOrder, accountId, image, 1, cores, memory)
        vm = VM(vmId, orderId, accountId, SYSTEM_ACCOUNT, image, size, cores, memory,
                store.macFor(vmId))
        vm.system = True
        vm.consoleObserver = onConsole
        self.vms[vmId] = vm
        self._bindSeller(vm, seller)
        vm.sellerAccountId = seller.account.id
        vm.moveTo(VMState.ALLOCATED)
        self._save(lambda c: store.updateVM(c, vmId, seller_account_id=vm.sellerAccountId,
                                            state=VMState.ALLOCATED))
        d = seller.control.callRemote(
            commands.StartVM, vm=vm.id, image=image, size=size, cores=cores, memory=memory,
            mac=vm.mac)
        d.addErrback(self._startFailed, vm, seller)
        return vm

    def endSystemVM(self, vm):
        if vm.active:
            self._end(vm, VMState.STOPPED, "the CPU benchmark is over")
        self._save(lambda c: store.closeOrder(c, vm.order, OrderState.DONE))

    def billable(self):
        """The VMs that run under a lease now (for billing)."""
        return [vm for vm in self.vms.values() if vm.leaseId is not None]

    def retryFunding(self, buyerId=None):
        """Funds may have come: try the VMs that waited for them again."""
        if buyerId is None:
            self.unfunded.clear()
        else:
            self.unfunded.pop(buyerId, None)
        self.capacityChanged()

    def outOfFunds(self, vm, why):
        self.log.info("VM {vm} of {buyer} stopped: {why}", vm=vm.id, buyer=vm.buyerName, why=why)
        self._end(vm, VMState.STOPPED, why)
        self.unfunded[vm.buyerId] = why

    def _showedLife(self, vm):
        """The VM's first frame reached the buyer, or its console printed: billing starts."""
        if vm.aliveAt is not None or vm.leaseId is None or not vm.active:
            return
        vm.aliveAt = when = self.reactor.seconds()
        vm.lifeWatch = None
        # Its traffic counts from now: what crossed before (its first frame
        # too, when that is its sign of life) is not billed.
        link = vm.link
        vm.netBase = 0 if link is None else -(link.bytesAB + link.bytesBA)
        self._armLink(vm)
        leaseId = vm.leaseId
        self._save(lambda c: leasesql.showedLife(c, leaseId, when))

    def _leftSeller(self, vm):
        if self.paths is not None:
            self.paths.left(vm)

    def directCounted(self, vmId, nbytes):
        """
        C{nbytes} more of C{vmId}'s frames went directly to another seller,
        as both ends agree (L{cpushare.server.market.paths}): billed as the
        relay's bytes are, from its first sign of life.
        """
        vm = self.vms.get(vmId)
        if vm is None or vm.leaseId is None or vm.aliveAt is None or not vm.active:
            return
        vm.netDirect += nbytes
        self._armLink(vm)

    def netLimitChanged(self, vm, limit):
        """A bill set how many bytes the VM's lease may carry in all."""
        vm.netLimit = limit
        self._armLink(vm)

    def _armLink(self, vm):
        """Give the VM's link its allowance: what the lease's hold still pays for."""
        link = vm.link
        if link is None:
            return
        if vm.aliveAt is None:
            # Not billed yet: its first frame to the buyer starts the lease.
            link.meter(None)
            link.watchFirstAB(vm.lifeWatch)
            return
        link.watchFirstAB(None)
        if vm.netLimit is None:
            link.meter(None)
        else:
            link.meter(max(0, vm.netLimit - vm.netBytes()),
                       lambda: self._holdSpent(vm, link))

    def _holdSpent(self, vm, link):
        """
        The VM's traffic used up what its lease holds: its frames are
        dropped while it is billed at once and its hold topped up; if that
        does not give it MIN_NET_ALLOWANCE more, it stops before anything
        more is charged.
        """
        if vm.link is not link or not vm.active or vm.leaseId is None:
            return
        defer.ensureDeferred(self._refill(vm, vm.leaseId)).addErrback(
            lambda f: self.log.failure("billing the traffic of VM {vm}", f, vm=vm.id))

    async def _refill(self, vm, leaseId):
        result = await self.billing.billNow(vm)
        if result is None or not vm.active or vm.leaseId != leaseId:
            return
        why = (f"the funds held for this VM are spent by its network traffic"
               f" at {formatAmount(vm.netFee)} a GB")
        if result.stop is not None:
            self.outOfFunds(vm, f"{why}: {result.stop}")
            return
        limit = result.netLimit
        if limit is not None and limit - vm.netBytes() < MIN_NET_ALLOWANCE:
            why += "; it was stopped before anything more was charged"
            self.log.info("VM {vm} of {buyer} stopped: {why}", vm=vm.id, buyer=vm.buyerName,
                          why=why)
            self._end(vm, VMState.STOPPED, why)
            return
        self.netLimitChanged(vm, limit)

    def _startFailed(self, failure, vm, seller):
        if vm.seller is seller and vm.active:
            self._end(vm, VMState.FAILED,
                      f"the seller could not start it: {failure.getErrorMessage()}")

    def _linkBuyer(self, vm, buyer):
        channel = nicChannel(vm.id)
        if channel in buyer.links or channel in vm.seller.links:
            return
        vm.foldLink()
        vm.link = self.relay.link(vm.seller, channel, buyer, channel)
        self._armLink(vm)
        vm.buyerSession = buyer
        buyer.control.callRemote(commands.PortAttached, vm=vm.id, mac=vm.mac)

    def vmState(self, seller, vmId, state, cpuSeconds, reason):
        stopping = seller.stopping.get(vmId)
        if stopping is not None:
            # The last word on a VM the market stopped: its final CPU time.
            if state in OVER:
                del seller.stopping[vmId]
                stopping.cpuSeconds = max(stopping.cpuSeconds, cpuSeconds)
                self._save(lambda c: store.updateVM(c, vmId, cpu_seconds=stopping.cpuSeconds))
                self._settleNow(stopping)
            return
        vm = seller.vms.get(vmId)
        if vm is None:
            away = self.vms.get(vmId)
            if away is not None and away.state == VMState.DETACHED and state in OVER \
                    and away.sellerAccountId == seller.account.id:
                # It ended while its seller was away; the seller says so now.
                away.cpuSeconds = max(away.cpuSeconds, cpuSeconds)
                self._end(away, state, reason or state, tellSeller=False)
                return
            raise NoSuchVM(f"VM {vmId} is not running on this seller")
        if state not in REPORTED:
            raise BadRequest(f"unknown VM state {state!r}")
        state = VMState(state)
        if state != vm.state:
            try:
                checkTransition(vmId, vm.state, state)
            except IllegalTransition as e:
                self.log.warn("seller {seller} refused: {error}",
                              seller=seller.account.name, error=str(e))
                raise BadRequest(str(e))
        vm.cpuSeconds = max(vm.cpuSeconds, cpuSeconds)
        if state in OVER:
            self._end(vm, state, reason or state, tellSeller=False)
            return
        if state == VMState.RUNNING and vm.started is None:
            vm.started = self.reactor.seconds()
        if state != vm.state:
            vm.moveTo(state)
        self._save(lambda c: store.updateVM(
            c, vmId, state=state, cpu_seconds=vm.cpuSeconds, started=vm.started))

    def _resultVM(self, seller, vmId):
        """C{vmId} as its seller reports on its result: running there, under a lease."""
        vm = seller.vms.get(vmId)
        if vm is None:
            raise NoSuchVM(f"VM {vmId} is not running on this seller")
        if vm.system:
            if vm.resultObserver is None:
                raise BadRequest(f"VM {vmId} is the market's own and takes no result now")
            return vm
        if vm.leaseId is None:
            raise BadRequest(f"VM {vmId} has no lease to report a result for")
        return vm

    async def resultChunk(self, seller, vmId, offset, data):
        """
        Bytes of C{vm}'s result at C{offset}, from its seller: passed on to
        the buyer's program, in order; answered once it took them.
        """
        vm = self._resultVM(seller, vmId)
        if vm.system:
            # The market's own VM (a canary): its few bytes stop here.
            sent = vm.resultSent[1]
            if offset != sent or not 0 < len(data) <= SYSTEM_RESULT_MAX - offset:
                raise BadRequest(f"result bytes {offset}+{len(data)} of VM {vmId} do not follow"
                                 f" the {sent} sent, up to {SYSTEM_RESULT_MAX}")
            vm.resultSent = (None, offset + len(data))
            return
        lease, sent = vm.resultSent
        if lease != vm.leaseId:
            sent = 0
        if vm.resultLease == vm.leaseId:
            raise BadRequest(f"VM {vmId}'s result was already reported")
        if offset != sent or not 0 < len(data) <= commands.IMAGE_CHUNK \
                or offset + len(data) > commands.RESULT_MAX:
            raise BadRequest(f"result bytes {offset}+{len(data)} of VM {vmId} do not follow"
                             f" the {sent} sent, in chunks of at most {commands.IMAGE_CHUNK},"
                             f" up to {commands.RESULT_MAX}")
        buyer = vm.buyerSession or self.buyerSession(vm.buyerId)
        if buyer is None or not buyer.connected:
            raise BadRequest(f"the buyer's program is not connected: VM {vmId}'s result"
                             " is not passed on")
        vm.resultSent = (vm.leaseId, offset + len(data))
        try:
            await buyer.control.callRemote(commands.ResultChunk, vm=vmId, offset=offset,
                                           data=data, order=vm.order)
        except Exception as e:
            vm.resultSent = (None, 0)
            raise BadRequest(f"the buyer's program did not take VM {vmId}'s result: {e}")
        if vm.resultSent[0] == vm.leaseId and vm.aliveAt is not None:
            # The bytes reached the buyer: they are billed like its VM's traffic.
            vm.netBase += len(data)

    async def resultReady(self, seller, vmId, sha256, size):
        """
        The seller of C{vm} says its result is C{size} bytes of digest
        C{sha256} (checked as a sha256 by the protocol): recorded once a
        lease, for a VM running on this seller under a lease, and passed on
        to the buyer's program when it took every byte.
        """
        vm = self._resultVM(seller, vmId)
        if vm.system:
            # The market's own VM (a canary): its observer takes the result, once.
            observer, vm.resultObserver = vm.resultObserver, None
            observer(sha256, size)
            return
        if not 0 <= size <= commands.RESULT_MAX:
            raise BadRequest(f"result size {size} is not within 0 to {commands.RESULT_MAX} bytes")
        leaseId = vm.leaseId
        if vm.resultLease == leaseId:
            raise BadRequest(f"VM {vmId}'s result was already reported")
        vm.resultLease = leaseId
        figures = self.board.figures(seller)
        cpu = "/".join(figures.cpu) if figures.cpu else None
        orderId, sellerId, reported = vm.order, seller.account.id, self.reactor.seconds()
        self.log.info("VM {vm} result: {size} bytes, sha256 {sha256}", vm=vmId, size=size,
                      sha256=sha256)
        recorded = await self.db.runInOrder(
            lambda c: marketsql.addResult(c, leaseId, vmId, orderId, sellerId,
                                          figures.country, cpu, sha256, size, reported))
        if not recorded:
            raise BadRequest(f"VM {vmId}'s result was already reported")
        self.verdicts.outcome(vm, sha256, leaseId, sellerId)
        buyer = vm.buyerSession or self.buyerSession(vm.buyerId)
        lease, sent = vm.resultSent
        if (sent if lease == leaseId else 0) == size and buyer is not None and buyer.connected:
            buyer.control.callRemote(commands.ResultReady, vm=vmId, sha256=sha256, size=size,
                                     order=orderId).addErrback(
                lambda f: self.log.warn("passing on VM {vm}'s result: {why}", vm=vmId,
                                        why=f.getErrorMessage()))

    # -- verdicts (L{verdicts_.Verdicts} calls these)

    def addReplica(self, group):
        """One more replica in C{group}: a tie-break, or an adaptive order's second run."""
        def failed(f):
            group.adding = False
            self.log.failure("adding a replica to group {n} of order {order}", f,
                             n=group.number, order=group.order)
        defer.ensureDeferred(self._addReplica(group)).addErrback(failed)

    async def _addReplica(self, group):
        model = next((vm for vm in self.groups.get(group.key, ()) if vm.id in group.members),
                     None)
        if model is None:
            model = await self._modelVM(group)
        vmId = await self.db.run(marketsql.addReplicaVM, group.order, group.number)
        self.verdicts.added(group, vmId)
        vm = VM(vmId, group.order, model.buyerId, model.buyerName, model.image, model.size,
                model.cores, model.memory, store.macFor(vmId), model.screens, model.budget)
        self.vms[vmId] = vm
        k = len(group.members)
        self._join(vm, group.number, k, model.diversity)
        for other in self.groups.get(group.key, ()):
            other.replicas = k
        self.log.info("VM {vm}: replica {k} of group {n} of order {order}", vm=vmId, k=k,
                      n=group.number, order=group.order)
        if not self._allocate(vm):
            vm.reason = self.whyWaiting(vm)

    async def _modelVM(self, group):
        """A VM like those of C{group}, from the database (its replicas ended before a restart)."""
        orderId = group.order

        def read(cursor):
            image, cores, memory, buyerName = store.orderTerms(cursor, orderId)
            return (image, store.imageSize(cursor, group.buyer, image) or 0, cores, memory,
                    buyerName, marketsql.orderScreens(cursor, {orderId}),
                    marketsql.orderReplicas(cursor, orderId))

        image, size, cores, memory, buyerName, screens, (_, diversity) = \
            await self.db.run(read)
        arguments, budget = screens.get(orderId, ({}, None))
        vm = VM(0, orderId, group.buyer, buyerName, image, size, cores, memory, "",
                Screens.fromArguments(**arguments), budget)
        vm.diversity = frozenset(diversity)
        return vm

    def stopRejected(self, vmId, why):
        """A replica's result was rejected: it stops (nothing more of it is paid)."""
        vm = self.vms.get(vmId)
        if vm is not None and vm.active:
            self._end(vm, VMState.STOPPED, why)

    def groupDecided(self, group):
        """
        C{group} is decided: its replicas no longer keep others off their
        sellers, and one still waiting for a seller (its time ran out) ends.
        """
        members = self.groups.pop(group.key, set())
        for vm in members:
            if vm.active:
                self.groups.setdefault(group.key, set()).add(vm)
        for vmId in sorted(group.members):
            vm = self.vms.get(vmId)
            if vm is not None and vm.state == VMState.PENDING:
                self._end(vm, VMState.STOPPED, "its replica group was decided without it")

    async def results(self, account, orderId, after=None):
        """A page of the results of this account's order C{orderId}: (rows, more)."""
        if await self.db.run(store.orderAccount, orderId) != account.id:
            raise BadRequest(f"you have no order {orderId}")
        rows = await self.db.run(marketsql.orderResults, orderId, after,
                                 commands.RESULTS_PAGE + 1)
        for row in rows:
            vm = self.vms.get(row["vm"])
            if vm is not None:
                row["state"] = vm.state
        rows = [{k: v for k, v in row.items() if v is not None} for row in rows]
        return paging.pageOf(commands.ListResults, "results", rows, commands.RESULTS_PAGE)

    def fetchChunk(self, seller, vmId, offset, length):
        vm = seller.vms.get(vmId)
        if vm is None:
            raise NoSuchVM(f"VM {vmId} is not assigned to this seller")
        if not 0 <= offset <= vm.size or not 0 < length <= commands.IMAGE_CHUNK:
            raise BadRequest(f"bad range {offset}+{length} of a {vm.size}-byte image")
        return self.images.readChunk(vm.image, offset, length)

    def reattach(self, seller, vmIds):
        """A seller came back with these VMs still running: keep ours."""
        keep = []
        for vmId in vmIds:
            vm = self.vms.get(vmId)
            if vm is None or not vm.active or vm.sellerAccountId != seller.account.id \
                    or (vm.seller is not None and vm.seller is not seller):
                continue
            if vm.graceCall is not None and vm.graceCall.active():
                vm.graceCall.cancel()
            vm.graceCall = None
            self._bindSeller(vm, seller)
            if self.paths is not None and vm.leaseId is not None:
                self.paths.joined(vm, seller)
            if vm.screens.trusted and vm.leaseId is not None and self.attestations is not None:
                # Its seller's new connection must attest it again, soon.
                self.attestations.resume(vm, seller, vm.leaseId)
            if vm.state == VMState.DETACHED and self._move(vm, VMState.RUNNING):
                vm.reason = None
            buyer = self.buyerSession(vm.buyerId)
            if buyer is not None:
                self._linkBuyer(vm, buyer)
            keep.append(vmId)
        if keep:
            self.log.info("seller {seller} reattached VMs {vms}",
                          seller=seller.account.name, vms=keep)
        return keep

    def sessionLost(self, session):
        for vm in list(getattr(session, "vms", {}).values()):
            if vm.seller is session and vm.active:
                if vm.system:
                    self._end(vm, VMState.LOST, "the seller disconnected", tellSeller=False)
                else:
                    self._detach(vm, "the seller disconnected")
        for vm in self.vms.values():
            if vm.buyerSession is session:
                vm.buyerSession = None
                # Another buyer program of the account takes the VM's port.
                other = self.buyerSession(vm.buyerId)
                if other is not None and vm.seller is not None and vm.active:
                    self._linkBuyer(vm, other)
            vm.consoles.discard(session)

    def _detach(self, vm, why):
        vm.seller = None
        self._leftSeller(vm)
        if not self._move(vm, VMState.DETACHED):
            return
        vm.reason = f"{why}; waiting up to {self.grace:.0f}s for it to come back"
        vm.graceCall = self.reactor.callLater(self.grace, self._graceOver, vm)

    def _graceOver(self, vm):
        vm.graceCall = None
        if vm.state != VMState.DETACHED or not self._move(vm, VMState.PENDING):
            return
        self.log.warn("VM {vm}: its seller did not come back in {grace:.0f}s; placing it again",
                      vm=vm.id, grace=self.grace)
        vm.reason = "its seller did not come back; waiting for capacity"
        vm.foldLink()
        self._endLease(vm, "its seller did not come back", waitForSeller=False)
        # It boots again from scratch: its uptime and CPU seconds (the ones
        # its next lease is billed for) start anew, as its new QEMU's do.
        vm.started = None
        vm.cpuSeconds = 0.0
        vm.sellerAccountId = None
        vm.mark = None
        self._save(lambda c: store.updateVM(c, vm.id, state=VMState.PENDING,
                                            seller_account_id=None, started=None,
                                            cpu_seconds=0.0, reason=vm.reason))
        self._allocate(vm)

    def _end(self, vm, state, reason, tellSeller=True, refill=True):
        if not self._move(vm, state):
            return
        seller = vm.seller
        vm.reason = reason
        waiters, vm.endWaiters = vm.endWaiters, []
        for d in waiters:
            d.callback((state, reason))
        if vm.graceCall is not None and vm.graceCall.active():
            vm.graceCall.cancel()
        vm.graceCall = None
        for session in vm.consoles:
            session.unroute(consoleChannel(vm.id))
            if session.connected:
                session.channelUnlinked(consoleChannel(vm.id), f"VM {vm.id} {state}: {reason}")
        vm.consoles.clear()
        if seller is not None:
            seller.vms.pop(vm.id, None)
            seller.unroute(consoleChannel(vm.id))
            link = seller.links.get(nicChannel(vm.id))
            if link is not None:
                others = tuple(s for s in (link.a, link.b) if s is not seller)
                self.relay.unlink(link, reason, notify=others)
            if tellSeller and seller.connected:
                seller.stopping[vm.id] = vm
                seller.control.callRemote(commands.StopVM, vm=vm.id).addErrback(
                    lambda f: self.log.warn("stopping VM {vm}: {why}", vm=vm.id,
                                            why=f.getErrorMessage()))
        if vm.buyerSession is not None and vm.buyerSession.connected:
            vm.buyerSession.control.callRemote(commands.PortDetached, vm=vm.id, reason=reason)
        vm.buyerSession = None
        vm.seller = None
        self._leftSeller(vm)
        self.vms.pop(vm.id, None)
        self._leave(vm)
        # Its seller ended it (or could not start it): a replica without a
        # result.  The buyer or the market ended it: it is not judged.
        self.verdicts.outcome(
            vm, verdicts_.NO_RESULT if state == VMState.FAILED or not tellSeller
            else verdicts_.EXCUSED, vm.leaseId, vm.sellerAccountId)
        vm.foldLink()
        self._endLease(vm, reason, waitForSeller=seller is not None and tellSeller
                       and seller.connected)
        ended = self.reactor.seconds()
        self._save(lambda c: store.updateVM(
            c, vm.id, state=state, reason=reason, ended=ended, cpu_seconds=vm.cpuSeconds))
        self.log.info("VM {vm} {state}: {reason}", vm=vm.id, state=state, reason=reason)
        if seller is not None and refill:
            self.capacityChanged()

    def _endLease(self, vm, reason, waitForSeller):
        """
        The lease of C{vm} ends: it is settled once the seller has reported
        the VM's last CPU seconds, or at once when the seller cannot.
        """
        leaseId, vm.leaseId = vm.leaseId, None
        if leaseId is None:
            return
        vm.endReason = reason
        vm.endedAt = ended = self.reactor.seconds()
        self._save(lambda c: leasesql.endLease(c, leaseId, ended, reason))
        if waitForSeller:
            call = self.reactor.callLater(SETTLE_WAIT, self._settleNow, vm)
            self.settling[vm.id] = (leaseId, call)
        else:
            self.billing.settle(leaseId, vm.cpuSeconds, vm.netBytes(), reason, vm.endedAt)

    def _settleNow(self, vm):
        entry = self.settling.pop(vm.id, None)
        if entry is None:
            return
        leaseId, call = entry
        if call.active():
            call.cancel()
        self.billing.settle(leaseId, vm.cpuSeconds, vm.netBytes(), vm.endReason,
                                   vm.endedAt)

    def _move(self, vm, state):
        """
        Move C{vm} to C{state} by the table; a move it refuses is logged in
        one line and changes nothing: False.
        """
        try:
            vm.moveTo(state)
        except IllegalTransition as e:
            self.log.warn("refused: {error}", error=str(e))
            return False
        return True

    def _save(self, fn):
        d = self.db.runInOrder(fn)
        d.addErrback(lambda f: self.log.failure("saving VM state", f))
        return d

    def leases(self, account, before=None):
        """
        A page of the leases of this account's VMs, newest first, older than
        lease C{before} when given: (leases, more).
        """
        d = self.db.run(leasesql.accountLeases, account.id, before, commands.LEASES_PAGE + 1)

        def page(rows):
            rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
            return paging.pageOf(commands.ListLeases, "leases", rows, commands.LEASES_PAGE)

        return d.addCallback(page)

    def list(self, account, before=None):
        """
        A page of this account's VMs, newest first, older than VM C{before}
        when given: (VMs, more).  Live figures for active ones, stored ones
        for the rest.
        """
        d = self.db.run(store.accountVMs, account.id, before, commands.VMS_PAGE + 1)

        def merge(rows):
            for row in rows:
                vm = self.vms.get(row["vm"])
                if vm is not None and vm.buyerId == account.id:
                    row.update(state=vm.state, reason=vm.reason, ip=vm.ip,
                               started=vm.started, cpu_seconds=vm.cpuSeconds,
                               seller=vm.seller.account.name if vm.seller else row["seller"])
                row["reason"] = paging.clip(row["reason"])
            rows = [{k: v for k, v in row.items() if v is not None} for row in rows]
            return paging.pageOf(commands.ListVMs, "vms", rows, commands.VMS_PAGE)

        return d.addCallback(merge)

    def sellerLeases(self, account, before=None):
        """
        A page of the leases that ran on C{account}'s sellers, newest first,
        older than lease C{before} when given: (leases, more).  Nothing about
        their buyers.
        """
        d = self.db.run(leasesql.sellerLeases, account.id, before, commands.LEASES_PAGE + 1)

        def page(rows):
            rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
            return rows[:commands.LEASES_PAGE], len(rows) > commands.LEASES_PAGE

        return d.addCallback(page)

    def lastLeases(self, account, vmIds):
        """
        Fires with {vm id: {"lease", "rating"}}: the newest lease of each of
        C{account}'s VMs among C{vmIds}, the one its buyer rates.
        """
        return self.db.run(leasesql.vmLastLeases, account.id, vmIds)

    def costs(self, account, vmIds):
        """Fires with {vm id: what its leases charged C{account}} for those of its VMs."""
        return self.db.run(leasesql.vmCharges, account.id, vmIds)
