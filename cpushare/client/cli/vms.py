"""
The buyer's commands about images, orders, VMs and consoles:

    cpushare image upload job.iso        cpushare image list
    cpushare order place --image job.iso|SHA256 --vms N [--cores C] [--memory MB]
                         [--replicas K|auto [--diverse country,cpu,owner] [--compare CMD]]
                         [--dry-run] [--explain]
    cpushare order cancel ORDER
    cpushare vms [--paths] [--json]      cpushare vm stop VM
    cpushare results ORDER [--json]
    cpushare console VM
"""

import json
import os
import re
import shlex
import sys

from twisted.internet import defer, stdio
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from cpushare.client.cli.connection import CommandError, Connection
from cpushare.client.home import comparatorPath, resultPath, saveComparator
from cpushare.client.cli.output import (
    actions, amount, ask, command, duration, formatTable, printedAsJSON, printListing)
from cpushare.client.cli.screens import (
    addReplicaArguments, addScreenArguments, comparatorWords, replicaArguments,
    screenArguments)
from cpushare.money import formatAmount
from cpushare.imagefolder import hashFile
from cpushare.protocol import commands
from cpushare.protocol.commands import consoleChannel

SHA256 = re.compile(r"[0-9a-f]{64}\Z")
ESCAPE = b"\x1d"  # Ctrl-]
CURSOR_QUERY = b"\x1b[6n"


async def resolveImage(reactor, image):
    """An --image argument (a sha256, or an ISO file to hash) as a sha256."""
    if SHA256.match(image):
        return image
    if os.path.isfile(image):
        sha256, _ = await deferToThreadPool(
            reactor, reactor.getThreadPool(), hashFile, image)
        return sha256
    raise CommandError(f"--image {image}: neither a sha256 nor an ISO file")


async def orderPlace(reactor, args, home):
    extra = screenArguments(args)
    extra.update(replicaArguments(args))
    compare = comparatorWords(args)
    if compare is not None:
        extra["compare"] = True
    if args.budget is not None:
        extra["budget"] = amount(args.budget, "--budget")
    for flag in ("dry_run", "explain"):
        if getattr(args, flag):
            extra[flag] = True
    sha256 = await resolveImage(reactor, args.image)
    async with Connection(reactor, home) as market:
        placed = await market.call(commands.PlaceOrder, image=sha256, vms=args.vms,
                                   cores=args.cores, memory=args.memory, **extra)
    if compare is not None and not args.dry_run:
        await keepComparator(reactor, home, placed["order"], compare)
    if printedAsJSON(args, placed):
        return
    if args.dry_run:
        print(formatDryRun(placed, args.vms, extra.get("replicas")))
        return
    for line in placed.get("explain") or ():
        print(f"waiting: {line}")
    ids = ", ".join(str(v) for v in placed["vm_ids"])
    print(f"order {placed['order']}: VMs {ids}; {placed['allocated']} placed on sellers now")
    if placed.get("waiting"):
        print(f"the rest wait: {placed['waiting']}")
    if compare is not None:
        print(f"results that differ are compared on this computer by your buyer program with:"
              f" {shlex.join(compare)} FILE_A FILE_B")


async def keepComparator(reactor, home, order, words):
    """Keep order C{order}'s comparator where the buyer's program finds it."""
    try:
        await deferToThreadPool(reactor, reactor.getThreadPool(), saveComparator, home.path,
                                order, words)
    except OSError as e:
        path = comparatorPath(home.path, order)
        raise CommandError(
            f"order {order} is placed, but its comparator could not be kept in {path}: {e};"
            f" write {json.dumps({'argv': words})} there, or cancel the order")


async def orderCancel(reactor, args, home):
    stopped = (await ask(reactor, home, commands.CancelOrder, order=args.order))["stopped"]
    print(f"order {args.order} cancelled; {stopped} VMs stopped")


def formatDryRun(plan, vms, replicas):
    """What a dry run of an order answered, for a person."""
    what = "replica group" if replicas else "VM"
    rows = [(what.upper(), "SELLER", "COUNTRY", "PRICE/CORE-H", "HOLD")]
    for p in plan.get("plan") or ():
        rows.append((str(p["group"]), p["seller"], p.get("country") or "-",
                     formatAmount(p["price"]), formatAmount(p["hold"])))
    total = vms * (replicas or 1)
    lines = ["dry run: nothing was placed and nothing is held"]
    if len(rows) > 1:
        lines.append(formatTable(rows))
    if len(plan.get("plan") or ()) < plan["allocated"]:
        lines.append(f"(the first {len(plan['plan'])} of {plan['allocated']} shown)")
    lines.append(f"{plan['allocated']} of {total} VMs would be placed now; the market would"
                 f" hold {formatAmount(plan['hold'])} of your funds for their first window")
    if plan.get("premium") is not None:
        lines.append(f"trusted computing costs {formatAmount(plan['premium'])} more an hour"
                     " for these VMs at full tilt than their sellers' normal prices")
    for line in plan.get("explain") or ([plan["waiting"]] if plan.get("waiting") else []):
        lines.append(f"waiting: {line}")
    return "\n".join(lines)


def formatVMs(vms, now):
    rows = [("VM", "ORDER", "GROUP", "SELLER", "STATE", "MAC", "IP", "UPTIME", "CPU", "REASON")]
    for vm in vms:
        started, ended = vm.get("started"), vm.get("ended")
        up = "-" if started is None else duration((ended or now) - started)
        rows.append((
            str(vm["vm"]), str(vm["order"]), str(vm.get("replica_group") or "-"),
            vm.get("seller") or "-", vm["state"], vm["mac"],
            vm.get("ip") or "-", up, f"{vm['cpu_seconds']:.1f}s", vm.get("reason") or "",
        ))
    return formatTable(rows)


def formatPaths(paths, now=None):
    """The pairs of sellers of the buyer's VMs: direct or relayed, round trip, bytes."""
    rows = [("SELLERS", "VMS", "PATH", "RTT", "DIRECT BYTES", "WHY")]
    for p in paths:
        rtt = p.get("rtt_ms")
        rows.append((
            f"{p['seller_a']} - {p['seller_b']}",
            f"{','.join(map(str, p['vms_a']))} - {','.join(map(str, p['vms_b']))}",
            p["state"], "-" if rtt is None else f"{rtt:.1f} ms", str(p["direct_bytes"]),
            p.get("why") or ""))
    return formatTable(rows)


async def listVMs(reactor, args, home):
    async with Connection(reactor, home) as market:
        if args.paths:
            paths = await market.every(commands.ListPaths, "paths", "index", "after")
        else:
            vms = await market.every(commands.ListVMs, "vms", "vm", "before")
    if args.paths:
        printListing(args.json, paths, "no pair of sellers runs your VMs: every VM's frames"
                     " go through the relay", formatPaths)
        return
    printListing(args.json, vms, "no VMs: place an order with 'cpushare order place'", formatVMs)


def formatResults(results, now):
    """An order's results, by replica group: each replica's lease, seller, result and verdict."""
    rows = [("GROUP", "VM", "LEASE", "SELLER", "COUNTRY", "CPU", "STATE", "SIZE", "SHA256",
             "VERDICT", "SAVED")]
    for r in sorted(results, key=lambda r: (r.get("replica_group") or 0, r["vm"])):
        size, lease = r.get("size"), r.get("lease")
        rows.append((
            str(r.get("replica_group") or "-"), str(r["vm"]), "-" if lease is None else str(lease),
            r.get("seller") or "-", r.get("country") or "-", r.get("cpu") or "-", r["state"],
            "-" if size is None else str(size), r.get("sha256") or "no result",
            r.get("verdict") or "-", r.get("saved") or "-",
        ))
    return formatTable(rows)


async def listResults(reactor, args, home):
    async with Connection(reactor, home) as market:
        found = await market.every(commands.ListResults, "results", "vm", "after",
                                   order=args.order)
    found = [{k: v for k, v in r.items() if v is not None} for r in found]
    for r in found:
        # Where this machine's buyer program saved it, if it did.
        path = resultPath(home.path, args.order, r["vm"])
        if "sha256" in r and os.path.exists(path):
            r["saved"] = path
    printListing(args.json, found, f"order {args.order} has no VMs", formatResults)


async def vmStop(reactor, args, home):
    async with Connection(reactor, home) as market:
        await market.call(commands.StopVM, vm=args.vm)
    print(f"VM {args.vm} stopped")


@implementer(IHalfCloseableProtocol)
class _Keyboard(Protocol):
    """
    Standard input to the console; Ctrl-] (on a terminal) leaves.  The end
    of piped input closes only the input: the VM's output goes on.
    """

    def __init__(self, send, done, interactive):
        self.send = send
        self.done = done
        self.interactive = interactive

    def dataReceived(self, data):
        if self.interactive and ESCAPE in data:
            data = data[:data.index(ESCAPE)]
            if data:
                self.send(data)
            if not self.done.called:
                self.done.callback(None)
            return
        self.send(data)

    def readConnectionLost(self):
        if not self.done.called:
            self.done.callback(None)

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.readConnectionLost()


class PipedTyping:
    """
    Piped input typed into a VM's shell as a person at a terminal would:
    a line at a time, each once the shell shows its next prompt, so each
    command's output follows its command.  The livecd's shell (busybox)
    marks its prompts by asking the terminal where the cursor is (ESC [ 6
    n); with a guest that does not, the next line goes after QUIET seconds
    without output.
    """

    QUIET = 1.0

    def __init__(self, reactor, send):
        self.reactor = reactor
        self.send = send
        self.lines = []
        self.partial = b""
        self.tail = b""
        self.ready = False
        self.ended = False
        self.typed = defer.Deferred()
        self._quiet = None
        self._restartQuiet()

    def input(self, data):
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        self.lines.extend(line + b"\n" for line in lines)
        self._pump()

    def inputEnded(self):
        if self.partial:
            self.lines.append(self.partial)
            self.partial = b""
        self.ended = True
        self._pump()

    def output(self, data):
        self.tail = (self.tail + data)[-len(CURSOR_QUERY):]
        if CURSOR_QUERY in data or self.tail == CURSOR_QUERY:
            self.tail = b""
            self.ready = True
            self._pump()
        self._restartQuiet()

    def _restartQuiet(self):
        if self._quiet is not None and self._quiet.active():
            self._quiet.cancel()
        self._quiet = self.reactor.callLater(self.QUIET, self._quietNow)

    def _quietNow(self):
        self._quiet = None
        self.ready = True
        self._pump()

    def _pump(self):
        if self.ready and self.lines:
            self.ready = False
            self.send(self.lines.pop(0))
        if self.ended and not self.lines and not self.typed.called:
            if self._quiet is not None and self._quiet.active():
                self._quiet.cancel()
            self.typed.callback(None)


async def console(reactor, args, home):
    """
    Attach to a VM's serial console: the recent output, then whatever
    follows; what is typed goes in.  On a terminal, Ctrl-] leaves.  Fed
    from a pipe, it types the input and leaves --linger seconds after the
    input ends.
    """
    interactive = sys.stdin.isatty()
    async with Connection(reactor, home) as market:
        session = market.session
        channel = consoleChannel(args.vm)
        out = sys.stdout.buffer
        ended = defer.Deferred()

        typing = None if interactive else PipedTyping(
            reactor, lambda data: session.sendFrame(channel, data))

        def show(data):
            out.write(data)
            out.flush()
            if typing is not None:
                typing.output(data)

        def gone(ch, reason):
            if ch == channel and not ended.called:
                ended.callback(reason)

        session.route(channel, show)
        session.channelUnlinked = gone
        await market.call(commands.AttachConsole, vm=args.vm)
        done = defer.Deferred()
        saved = None
        if interactive:
            import termios
            import tty
            saved = termios.tcgetattr(sys.stdin.fileno())
            tty.setraw(sys.stdin.fileno())
            print(f"[console of VM {args.vm}; Ctrl-] leaves]\r", file=sys.stderr)
        if interactive:
            keyboard = stdio.StandardIO(
                _Keyboard(lambda data: session.sendFrame(channel, data), done, True),
                reactor=reactor)
        else:
            keyboard = stdio.StandardIO(_Keyboard(typing.input, done, False), reactor=reactor)
            done.addCallback(lambda _: typing.inputEnded())
            done.addCallback(lambda _: typing.typed)
        try:
            # With fireOnOneCallback a DeferredList fires with (result, index).
            _, which = await defer.DeferredList(
                [done, ended, session.whenLost()], fireOnOneCallback=True, consumeErrors=True)
            if which == 0 and not interactive:
                linger = defer.Deferred()
                reactor.callLater(args.linger, linger.callback, None)
                await defer.DeferredList([linger, ended], fireOnOneCallback=True)
        finally:
            if saved is not None:
                import termios
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
            keyboard.loseConnection()
        if ended.called:
            print(f"\r\n[VM {args.vm}: {ended.result}]", file=sys.stderr)


def addParsers(sub):
    orders = actions(sub, "order", "place and cancel buy orders")
    place = command(orders, "place", orderPlace, json=True,
                    help="run VMs booting one of your images")
    place.add_argument("--image", required=True, help="an uploaded ISO file, or its sha256")
    place.add_argument("--vms", type=int, default=1, help="how many VMs (default 1)")
    place.add_argument("--cores", type=int, default=1, help="cores per VM (default 1)")
    place.add_argument("--memory", type=int, default=256, help="MB per VM (default 256)")
    place.add_argument("--budget", metavar="AMOUNT",
                       help="the most the order may spend; its VMs stop when it is spent")
    place.add_argument("--dry-run", action="store_true",
                       help="show where the VMs would go and what would be held;"
                            " place and hold nothing")
    place.add_argument("--explain", action="store_true",
                       help="say why each replica group that waits does")
    addReplicaArguments(place, placing=True)
    addScreenArguments(place)
    cancel = command(orders, "cancel", orderCancel, help="stop all VMs of an order")
    cancel.add_argument("order", type=int)

    vms = command(sub, "vms", listVMs, json=True, help="list your VMs")
    vms.add_argument("--paths", action="store_true",
                     help="instead, each pair of sellers running your VMs: direct or relayed,"
                          " with its round trip")

    results = command(sub, "results", listResults, json=True,
                      help="the results of an order's VMs, by replica group")
    results.add_argument("order", type=int)

    vmActions = actions(sub, "vm", "act on one VM")
    stop = command(vmActions, "stop", vmStop, help="stop a VM")
    stop.add_argument("vm", type=int)

    c = command(sub, "console", console, help="attach to a VM's serial console")
    c.add_argument("vm", type=int)
    c.add_argument("--linger", type=float, default=2.0,
                   help="with piped input: seconds to keep showing output after it ends")
