"""
The CPU benchmark: a score for each seller that the market measures
itself, inside a VM of the reference livecd on the seller's own computer.

The market keeps a benchmark image: the reference livecd with a small
program, /cpushare/bench, and no network (it never waits for DHCP).  When
a seller comes online, and every C{every} seconds after, the market runs a
VM of it on the seller (one core, 256 MB, like any VM: the seller cannot
tell it from a buyer's), waits for the guest's shell on the serial
console, and types a challenge:

    /cpushare/bench NONCE MB

The guest hashes the nonce and MB mebibytes of zeros with SHA-256 and
prints

    CPUSHARE-BENCH-RESULT NONCE DIGEST

The market checks the digest (computed on its own thread pool) and times
the exchange itself: the score is the MB hashed per second.  A fresh nonce
each time means the work cannot be skipped or replayed, and the clock is
the market's, so the seller can make its score lower, never higher.  The
VM is stopped at once; benchmark VMs are not billed.

At most C{AT_ONCE} benchmarks run at a time, market-wide, so sellers
coming back together after a restart do not all fetch the benchmark image
and boot it at once.

A seller keeps its score while it stays online; one that fails the
benchmark (a wrong digest, no answer within C{timeout}) keeps none and
fails --min-cpu screens.

The same image answers the market's canaries (L{cpushare.server.market.canary}):
/cpushare/canary SEED MB sends the same digest as the VM's result.  What
both share is here: the guest's programs, booting a market VM and typing
a line at its shell (L{SystemRun}), and taking each seller online in turn
(L{SellerTurns}).
"""

import hashlib
import os
import re
import secrets
import shutil

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from cpushare.imagefolder import hashFile
from cpushare.server.db import store

EVERY = 6 * 3600.0
FIRST = 5.0
MB = 16
TIMEOUT = 300.0
AT_ONCE = 4
CORES, MEMORY = 1, 256
# The account benchmark VMs belong to: a name registration cannot take.
SYSTEM_ACCOUNT = "~market"

# The file the built image is kept in, in the data folder: its number
# changes whenever the image's files do, so an older image is not reused.
IMAGE_FILE = "cpu-benchmark-2.iso"

DIGEST_PROGRAM = """#!/bin/sh
# /cpushare/digest SEED MB: the SHA-256 of SEED, a newline and MB MiB of zeros.
{ echo "$1"; dd if=/dev/zero bs=1048576 count="$2" 2>/dev/null; } | sha256sum | cut -d' ' -f1
"""

BENCH_PROGRAM = """#!/bin/sh
# The CPUShare CPU benchmark: /cpushare/bench NONCE MB
# hashes NONCE, a newline and MB MiB of zeros with SHA-256.
nonce=$1 mb=$2
digest=$(/cpushare/digest "$nonce" "$mb")
echo "CPUSHARE-BENCH-RESULT $nonce $digest"
"""

CANARY_PROGRAM = """#!/bin/sh
# The CPUShare canary: /cpushare/canary SEED MB sends the SHA-256 of SEED,
# a newline and MB MiB of zeros (hex, a newline) as this VM's result.
/cpushare/digest "$1" "$2" > /tmp/canary && cpushare-result /tmp/canary
"""

_RESULT = re.compile(rb"CPUSHARE-BENCH-RESULT ([0-9a-f]{32}) ([0-9a-f]{64})")
# busybox ash asks the terminal where the cursor is before each prompt.
_PROMPT = b"\x1b[6n"


def expectedDigest(nonce, mb):
    h = hashlib.sha256(nonce.encode("ascii") + b"\n")
    zeros = bytes(1024 * 1024)
    for _ in range(mb):
        h.update(zeros)
    return h.hexdigest()


def writeBenchFolder(folder):
    """The files the benchmark image adds to the reference livecd."""
    os.makedirs(folder, exist_ok=True)
    for name, program in (("digest", DIGEST_PROGRAM), ("bench", BENCH_PROGRAM),
                          ("canary", CANARY_PROGRAM)):
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write(program)
        os.chmod(path, 0o755)
    with open(os.path.join(folder, "no-network"), "w") as f:
        f.write("the CPU benchmark needs no network: do not wait for DHCP\n")
    return folder


def buildImage(path, cache=None):
    """Build the benchmark image at C{path}; returns (sha256, size)."""
    from cpushare.vm import livecd
    folder = path + ".files"
    shutil.rmtree(folder, ignore_errors=True)
    writeBenchFolder(folder)
    try:
        result = livecd.build(path + ".tmp", [folder], None, cache, lambda note: None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    os.replace(path + ".tmp", path)
    return result.sha256, result.size


def systemAccount(cursor, sha256, size):
    """The benchmark's account id; the image recorded as stored."""
    cursor.execute("SELECT id FROM accounts WHERE name = ?", (SYSTEM_ACCOUNT,))
    row = cursor.fetchone()
    if row is None:
        cursor.execute("INSERT INTO accounts (name, created) VALUES (?, ?) RETURNING id",
                       (SYSTEM_ACCOUNT, store.now()))
        row = cursor.fetchone()
    store.addAccountImage(cursor, row[0], sha256, size, "cpu-benchmark.iso")
    return row[0]


def roomFor(orders, session):
    """Whether C{session}'s seller has room for one more of the market's VMs now."""
    cores, memory = orders.used(session)
    return session.offer is not None and cores + CORES <= session.offer["cores"] and \
        memory + MEMORY <= session.offer["memory"]


class SystemRun:
    """
    One of the market's own VMs of the benchmark image on a seller, given
    C{timeout} seconds in all: C{boot} starts it, C{typeLine} waits for
    the guest's shell prompt and types a line, C{until} waits for what the
    VM must do, and C{stop} ends the VM.  C{what} and C{name} (the seller)
    name it in the log; C{why} says why it gave up, once it did.
    """

    log = Logger()

    def __init__(self, reactor, orders, timeout, what, name):
        self.reactor = reactor
        self.orders = orders
        self.timeout = timeout
        self.what = what
        self.name = name
        self.why = None
        self.vm = self.call = None
        self.seen = bytearray()
        self.typed = None               # where the output after the typed line begins
        self.prompt = defer.Deferred()
        self.found = None               # fired with (when, match) of the awaited output
        self.pattern = None
        self.stopped = False

    def console(self, data):
        seen = self.seen
        seen.extend(data)
        if self.typed is None:
            ready = seen.find(b"CPUSHARE-READY")
            if ready >= 0 and seen.find(_PROMPT, ready) >= 0 and not self.prompt.called:
                self.prompt.callback(True)
        elif self.pattern is not None:
            match = self.pattern.search(bytes(seen[self.typed:]))
            if match and not self.found.called:
                self.found.callback((self.reactor.seconds(), match))
        if len(seen) > 65536:
            del seen[:32768]
            if self.typed is not None:
                self.typed = max(0, self.typed - 32768)

    async def boot(self, session, accountId, sha256, size):
        """Start the VM on C{session}'s seller; returns it."""
        vm = await self.orders.systemVM(session, accountId, sha256, size, CORES, MEMORY,
                                        self.console)
        self.vm = vm
        self.ended = defer.Deferred()
        vm.endWaiters.append(self.ended)
        self.timedOut = defer.Deferred()
        self.call = self.reactor.callLater(self.timeout, self.timedOut.callback, None)
        return vm

    async def until(self, awaited, late):
        """What C{awaited} fires with, or None (logged) on the timeout or the VM's end."""
        value, which = await defer.DeferredList([awaited, self.timedOut, self.ended],
                                                fireOnOneCallback=True)
        if which == 1:
            self.why = f"{late} in {self.timeout:.0f}s"
        elif which == 2:
            self.why = f"its VM {value[0]}: {value[1]}"
        else:
            return value
        self.log.warn("{what} of {name}: {why}", what=self.what, name=self.name, why=self.why)
        return None

    async def typeLine(self, line, pattern=None):
        """
        Type C{line} at the guest's shell once its prompt shows: returns when
        it was typed, or None (the VM did not come up).  With C{pattern},
        C{found} fires with (when, match) of its first match in what the
        console shows after the line.
        """
        if await self.until(self.prompt, "its VM did not come up") is None:
            return None
        self.typed = len(self.seen)
        if pattern is not None:
            self.pattern, self.found = pattern, defer.Deferred()
        typed = self.reactor.seconds()
        self.vm.consoleInput(line.encode("ascii") + b"\n")
        return typed

    def stop(self):
        """End the VM (once)."""
        if self.call is not None and self.call.active():
            self.call.cancel()
        if self.vm is not None and not self.stopped:
            self.stopped = True
            self.orders.endSystemVM(self.vm)


class SellerTurns:
    """
    Gives each seller online a turn (C{run(session)}), again and again:
    C{firstWait()} seconds after it comes online, then C{nextWait()}
    seconds after each turn ends; never two turns of one seller at once,
    and at most C{atOnce} turns market-wide (the others queue).  C{what}
    names a turn in the log.  Turns stop for a seller that goes, and all
    of them when the market stops: the VMs of those running are ended
    (C{orders.endSystemVM}) and C{stopped} says why they were.
    """

    log = Logger()
    what = "a turn"

    def __init__(self, reactor, atOnce):
        self.reactor = reactor
        self.slots = defer.DeferredSemaphore(atOnce)
        self.calls = {}                 # session -> its next turn's DelayedCall
        self.queued = set()             # sessions waiting for a slot
        self.running = {}               # session -> the VM of its turn
        self.stopped = False

    @property
    def enabled(self):
        raise NotImplementedError

    def sellerOnline(self, session):
        if self.enabled and session not in self.calls and session not in self.queued \
                and session not in self.running:
            self.calls[session] = self.reactor.callLater(self.firstWait(), self._start, session)

    def sessionLost(self, session):
        call = self.calls.pop(session, None)
        if call is not None and call.active():
            call.cancel()

    def stop(self):
        self.stopped = True
        for call in self.calls.values():
            if call.active():
                call.cancel()
        self.calls.clear()
        for vm in list(self.running.values()):
            self.orders.endSystemVM(vm)

    def _start(self, session):
        self.calls.pop(session, None)
        if not session.connected:
            return
        self.queued.add(session)

        def turn():
            self.queued.discard(session)
            if not session.connected:
                return defer.succeed(None)
            return defer.ensureDeferred(self.run(session))

        d = self.slots.run(turn)
        d.addErrback(lambda f: self.log.failure("{what} of {name}", f, what=self.what,
                                                 name=session.account.name))
        d.addBoth(lambda _: self._again(session))

    def _again(self, session):
        if session.connected and self.enabled and not self.stopped \
                and session not in self.calls:
            self.calls[session] = self.reactor.callLater(self.nextWait(), self._start, session)


class CPUBench(SellerTurns):
    log = Logger()
    what = "CPU benchmark"

    def __init__(self, reactor, store, orders, rescored, images=None, image=None, every=EVERY,
                 mb=MB, timeout=TIMEOUT, first=FIRST, cache=None):
        """
        @param orders: runs the benchmark VMs: C{used}, C{systemVM} and
            C{endSystemVM} of L{cpushare.server.market.orders.Orders}.
        @param rescored: called with no argument when a seller's score changed
            (the board ranks its sellers again).
        @param images: the image store the benchmark image is put in.
        """
        SellerTurns.__init__(self, reactor, AT_ONCE)
        self.store = store
        self.orders = orders
        self.rescored = rescored
        self.images = images
        self.image = image              # a path; None: built in the data folder
        self.every = every
        self.mb = mb
        self.timeout = timeout
        self.first = first
        self.cache = cache
        self.sha256 = self.size = self.accountId = None
        # The canaries run VMs of the same image: it is made for them too.
        self.forCanaries = False

    @property
    def enabled(self):
        return bool(self.every) and self.sha256 is not None

    def firstWait(self):
        return self.first

    def nextWait(self):
        return self.every

    async def prepare(self, dataFolder):
        """Build (or take) the benchmark image and put it in the image store."""
        if not (self.every or self.forCanaries):
            return
        pool = self.reactor.getThreadPool()
        try:
            if self.image is None:
                path = os.path.join(dataFolder, IMAGE_FILE)
                if os.path.exists(path):
                    sha256, size = await deferToThreadPool(self.reactor, pool, hashFile, path)
                else:
                    self.log.info("building the CPU benchmark image {path}", path=path)
                    sha256, size = await deferToThreadPool(
                        self.reactor, pool, buildImage, path, self.cache)
            else:
                path = self.image
                sha256, size = await deferToThreadPool(self.reactor, pool, hashFile, path)
            images = self.images
            target = images.pathFor(sha256)
            if not os.path.exists(target):
                await deferToThreadPool(self.reactor, pool, shutil.copyfile, path, target)
            self.accountId = await self.store.run(systemAccount, sha256, size)
        except Exception as e:
            self.log.error("no CPU benchmark: the benchmark image could not be made: {why}",
                           why=str(e))
            return
        self.sha256, self.size = sha256, size
        self.log.info("CPU benchmark image {sha256} ({size} bytes); sellers are measured "
                      "every {every:.0f}s (0: never)", sha256=sha256, size=size,
                      every=self.every)

    def run(self, session):
        return self.measure(session)

    async def measure(self, session):
        """Run one benchmark VM on C{session}'s seller; returns the score or None."""
        name = session.account.name
        if not roomFor(self.orders, session):
            self.log.info("CPU benchmark of {name} put off: no room for it now", name=name)
            return None
        nonce = secrets.token_hex(16)
        expected = deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                     expectedDigest, nonce, self.mb)
        run = SystemRun(self.reactor, self.orders, self.timeout, self.what, name)
        self.running[session] = await run.boot(session, self.accountId, self.sha256, self.size)
        try:
            started = await run.typeLine(f"/cpushare/bench {nonce} {self.mb}", _RESULT)
            if started is None:
                return None
            answer = await run.until(run.found, "no result")
            if answer is None:
                return None
            finished, match = answer
            digest = match.group(2).decode("ascii")
            if match.group(1).decode("ascii") != nonce or digest != await expected:
                self.log.warn("CPU benchmark of {name}: a wrong result; no score", name=name)
                session.cpuScore = None
                self.rescored()
                return None
            score = self.mb / max(finished - started, 1e-3)
            session.cpuScore = score
            self.rescored()
            self.log.info("CPU benchmark of {name}: {score:.1f} MB/s of SHA-256 in one core "
                          "({mb} MB in {s:.2f}s)", name=name, score=score, mb=self.mb,
                          s=finished - started)
            return score
        finally:
            self.running.pop(session, None)
            run.stop()
