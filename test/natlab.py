"""
Direct paths between two sellers' ends across real NATs: the laboratory
that bench/natmatrix.py measures with and test/integration/test_nat_matrix.py
asserts with.  Needs root (test/netns.py).

A L{Lab} builds an internet (test/netns.py's L{Internet}) with the
market's "where am I" answer path on it (a reflector: bench/natpeer.py
reflect, the real Rendezvous), two sides of the kinds asked, and an
attacker's namespace straight on the internet.  A side's kind:

    public      the end runs in the internet's own namespace (the baseline)
    open        its own namespace with a public address and a fixed UDP
                port: the seller that opened a port (--udp-port)
    cone, restricted, symmetric
                a home behind a router with that NAT (test/netns.py)

L{Lab.trial} starts one end (bench/natpeer.py end) in each side, lets each
learn its public address from the reflector, hands each the other's
candidates and one pair secret, as the market brokers them, starts both
paths at one moment and collects what each end reports.
"""

import json
import os
import select
import subprocess
import sys
import time

from cpushare.mesh import path as meshpath

from .netns import NAT_KINDS, Internet, Network, run

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER = os.path.join(ROOT, "bench", "natpeer.py")

KINDS = ("open",) + NAT_KINDS
#: The first UDP port of an "open" side; each trial takes the next one.
OPEN_PORT = 40000
#: How long an end may take to start and learn its public address.
READY_TIMEOUT = 40.0
#: From the common start to the ends' results: punching, echoes, margin.
RESULT_TIMEOUT = meshpath.PUNCH_FOR + 10.0
#: The two ends start this long after both are ready.
START_DELAY = 0.5


class LabError(Exception):
    """An end or the reflector failed or did not answer in time (its output is included)."""


class Child:
    """A natpeer.py process in a namespace, spoken to in JSON lines."""

    def __init__(self, net, ns, name, args, logs):
        self.name = name
        self.logPath = os.path.join(logs, f"{name}.log")
        self._log = open(self.logPath, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        self.popen = subprocess.Popen(
            net.exec(ns, sys.executable, PEER, *args), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, env=env)
        self._buffer = b""

    def send(self, line):
        if not isinstance(line, str):
            line = json.dumps(line)
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def read(self, timeout, event=None):
        """The next JSON line (with C{event}, when given); LabError on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                document = json.loads(line)
                if event is None or document.get("event") == event:
                    return document
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail(f"no {event or 'answer'} within {timeout:.0f}s")
            ready, _, _ = select.select([self.popen.stdout], [], [], left)
            if ready:
                chunk = os.read(self.popen.stdout.fileno(), 65536)
                if not chunk:
                    self.fail(f"exited (status {self.popen.wait()}) before its {event or 'answer'}")
                self._buffer += chunk

    def fail(self, why):
        self._log.flush()
        with open(self.logPath, errors="replace") as f:
            raise LabError(f"{self.name}: {why}; its output:\n{f.read()[-4000:]}")

    def stop(self):
        """End of input, then SIGTERM, then SIGKILL; returns the exit status."""
        if self.popen.poll() is None:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.terminate()
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(5)
        self.popen.stdout.close()
        self._log.close()
        return self.popen.returncode


class Side:
    """Where one end runs: its namespace, the address it binds, its kind."""

    def __init__(self, kind, ns, address, bind="", router=None, wanIP=None):
        self.kind, self.ns, self.address = kind, ns, address
        self.bind, self.router, self.wanIP = bind, router, wanIP


class Trial:
    """
    One trial's two ends, still running after their results (for L{stats}
    and forged datagrams) until L{stop}.  C{results}: what each end said.
    """

    def __init__(self, ends, ready, results, sessions):
        self.ends, self.ready, self.results, self.sessions = ends, ready, results, sessions

    @property
    def direct(self):
        return all(r["direct"] for r in self.results)

    def stats(self):
        for end in self.ends:
            end.send("stats")
        return [end.read(10.0, "stats") for end in self.ends]

    def stop(self):
        for end in self.ends:
            end.stop()


class Lab:
    """
    Two sides of kinds C{kinds} on one internet whose access links are
    C{delay} ms long each way, named with C{prefix} (e.g. "nb-1234-");
    L{close} removes everything, whatever happened.
    """

    def __init__(self, prefix, kinds, logs, delay=0):
        for kind in kinds:
            if kind not in ("public",) + KINDS:
                raise ValueError(f"unknown side kind {kind!r}")
        self.kinds = tuple(kinds)
        self.delay = delay
        self.logs = logs
        self.net = Network(prefix)
        self.children = []
        self.sides = []
        self.trials = 0
        self.reflector = None

    def up(self):
        net = self.net
        internet = self.internet = Internet(net, delay=self.delay)
        for i, kind in enumerate(self.kinds):
            name = "ab"[i]
            if kind == "public":
                bind = f"10.250.0.{11 + i}"
                run("ip", "-n", internet.public, "addr", "add", f"{bind}/32", "dev", "lo")
                self.sides.append(Side(kind, internet.public, bind, bind=bind))
            elif kind == "open":
                ns, address = internet.host(name)
                self.sides.append(Side(kind, ns, address))
            else:
                home = internet.home(name, kind)
                self.sides.append(Side(kind, home.ns, home.address, router=home.router,
                                       wanIP=home.wanIP))
        self.attacker, self.attackerIP = internet.host("x")
        self.reflector = self._start(internet.public, "reflector",
                                     ["reflect", "--bind", internet.address])
        self.market = f"{internet.address}:{self.reflector.read(READY_TIMEOUT)['udp_port']}"
        return self

    def _start(self, ns, name, args):
        child = Child(self.net, ns, name, args, self.logs)
        self.children.append(child)
        return child

    def token(self):
        self.reflector.send("token")
        return self.reflector.read(10.0)["token"]

    def trial(self, skew=0.0):
        """
        Run one trial (L{Trial}); its ends keep running until its C{stop}.
        The second end starts C{skew} seconds after the first.
        """
        self.trials += 1
        n = self.trials
        secret = os.urandom(32).hex()
        sessions = [int.from_bytes(os.urandom(4), "big") | 1 for _ in range(2)]
        ids = ["seller-a", "seller-b"]
        ends = []
        try:
            for i, side in enumerate(self.sides):
                args = ["end", "--me", ids[i], "--peer", ids[1 - i], "--secret", secret,
                        "--local-session", sessions[i], "--remote-session", sessions[1 - i],
                        "--market", self.market, "--token", self.token()]
                if side.kind == "open":
                    args += ["--udp-port", OPEN_PORT + n]
                if side.bind:
                    args += ["--bind", side.bind]
                ends.append(self._start(side.ns, f"end-{'ab'[i]}-{n}", args))
            ready = [end.read(READY_TIMEOUT, "ready") for end in ends]
            for end, r in zip(ends, ready):
                if not r["candidates"]:
                    end.fail("learned no public address from the reflector")
            startAt = time.monotonic() + START_DELAY
            for i, end in enumerate(ends):
                end.send({"peer": ready[1 - i]["candidates"], "start_at": startAt + i * skew})
            results = [end.read(RESULT_TIMEOUT + START_DELAY + skew, "result") for end in ends]
        except BaseException:
            for end in ends:
                end.stop()
            raise
        return Trial(ends, ready, results, sessions)

    def forge(self, to, session, count, spoof=None):
        """
        From the attacker's namespace, C{count} datagrams of random bytes and
        C{count} with a valid-looking header for C{session} sealed with a
        wrong key, to C{to} (host, port), from C{spoof} (host, port) when
        given; returns what bench/natpeer.py forge says (bytes back included).
        """
        args = ["forge", "--to", f"{to[0]}:{to[1]}", "--session", session, "--count", count]
        if spoof is not None:
            args += ["--spoof", f"{spoof[0]}:{spoof[1]}"]
        child = self._start(self.attacker, f"forge-{len(self.children)}", args)
        try:
            return child.read(30.0, "forged")
        finally:
            child.stop()

    def close(self):
        for child in self.children:
            try:
                child.stop()
            except Exception as e:  # keep ending the others
                print(f"could not stop {child.name}: {e}", file=sys.stderr)
        self.net.down()
