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

BENCH_PROGRAM = """#!/bin/sh
# The CPUShare CPU benchmark: /cpushare/bench NONCE MB
# hashes NONCE, a newline and MB MiB of zeros with SHA-256.
nonce=$1 mb=$2
digest=$( { echo "$nonce"; dd if=/dev/zero bs=1048576 count="$mb" 2>/dev/null; } \\
    | sha256sum | cut -d' ' -f1)
echo "CPUSHARE-BENCH-RESULT $nonce $digest"
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
    path = os.path.join(folder, "bench")
    with open(path, "w") as f:
        f.write(BENCH_PROGRAM)
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


class CPUBench:
    log = Logger()

    def __init__(self, reactor, store, orders, rescored, images=None, image=None, every=EVERY,
                 mb=MB, timeout=TIMEOUT, first=FIRST, cache=None):
        """
        @param orders: runs the benchmark VMs: C{used}, C{systemVM} and
            C{endSystemVM} of L{cpushare.server.market.orders.Orders}.
        @param rescored: called with no argument when a seller's score changed
            (the board ranks its sellers again).
        @param images: the image store the benchmark image is put in.
        """
        self.reactor = reactor
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
        self.slots = defer.DeferredSemaphore(AT_ONCE)
        self.calls = {}                 # session -> the next benchmark's DelayedCall
        self.queued = set()             # sessions waiting for a benchmark slot
        self.running = {}               # session -> the VM measuring it

    @property
    def enabled(self):
        return bool(self.every) and self.sha256 is not None

    async def prepare(self, dataFolder):
        """Build (or take) the benchmark image and put it in the image store."""
        if not self.every:
            return
        pool = self.reactor.getThreadPool()
        try:
            if self.image is None:
                path = os.path.join(dataFolder, "cpu-benchmark.iso")
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
                      "every {every:.0f}s", sha256=sha256, size=size, every=self.every)

    def sellerOnline(self, session):
        if self.enabled and session not in self.calls and session not in self.queued \
                and session not in self.running:
            self.calls[session] = self.reactor.callLater(self.first, self._start, session)

    def sessionLost(self, session):
        call = self.calls.pop(session, None)
        if call is not None and call.active():
            call.cancel()

    def stop(self):
        for call in self.calls.values():
            if call.active():
                call.cancel()
        self.calls.clear()

    def _start(self, session):
        self.calls.pop(session, None)
        if not session.connected:
            return
        self.queued.add(session)

        def measure():
            self.queued.discard(session)
            if not session.connected:
                return defer.succeed(None)
            return defer.ensureDeferred(self.measure(session))

        d = self.slots.run(measure)
        d.addErrback(lambda f: self.log.failure("CPU benchmark of {name}", f,
                                                 name=session.account.name))
        d.addBoth(lambda _: self._again(session))

    def _again(self, session):
        if session.connected and self.every and session not in self.calls:
            self.calls[session] = self.reactor.callLater(self.every, self._start, session)

    async def measure(self, session):
        """Run one benchmark VM on C{session}'s seller; returns the score or None."""
        name = session.account.name
        orders = self.orders
        cores, memory = orders.used(session)
        if session.offer is None or cores + CORES > session.offer["cores"] or \
                memory + MEMORY > session.offer["memory"]:
            self.log.info("CPU benchmark of {name} put off: no room for it now", name=name)
            return None
        nonce = secrets.token_hex(16)
        expected = deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                     expectedDigest, nonce, self.mb)
        prompt, result = defer.Deferred(), defer.Deferred()
        seen = bytearray()
        state = {"typed": None}

        def console(data):
            seen.extend(data)
            if state["typed"] is None:
                ready = seen.find(b"CPUSHARE-READY")
                if ready >= 0 and seen.find(_PROMPT, ready) >= 0 and not prompt.called:
                    prompt.callback(True)
            else:
                match = _RESULT.search(bytes(seen[state["typed"]:]))
                if match and not result.called:
                    result.callback((self.reactor.seconds(), match))
            if len(seen) > 65536:
                del seen[:32768]
                if state["typed"] is not None:
                    state["typed"] = max(0, state["typed"] - 32768)

        vm = await orders.systemVM(session, self.accountId, self.sha256, self.size, CORES,
                                   MEMORY, console)
        self.running[session] = vm
        ended = defer.Deferred()
        vm.endWaiters.append(ended)
        timeout = defer.Deferred()
        call = self.reactor.callLater(self.timeout, timeout.callback, None)

        async def until(awaited, late):
            """What C{awaited} fires with, or None (logged) on the timeout or the VM's end."""
            value, which = await defer.DeferredList([awaited, timeout, ended],
                                                    fireOnOneCallback=True)
            if which == 1:
                self.log.warn("CPU benchmark of {name}: {late} in {t:.0f}s", name=name,
                              late=late, t=self.timeout)
                return None
            if which == 2:
                self.log.warn("CPU benchmark of {name}: its VM {state}: {reason}", name=name,
                              state=value[0], reason=value[1])
                return None
            return value

        try:
            if await until(prompt, "its VM did not come up") is None:
                return None
            state["typed"] = len(seen)
            started = self.reactor.seconds()
            vm.consoleInput(f"/cpushare/bench {nonce} {self.mb}\n".encode("ascii"))
            answer = await until(result, "no result")
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
            if call.active():
                call.cancel()
            self.running.pop(session, None)
            orders.endSystemVM(vm)
