"""
The flood benchmark (run by `make bench`; `bench/flood.py --quick` for a
smoke run): what 1,000 hostile connections cost a real market server, and
what an honest buyer notices meanwhile.

A fresh `twistd cpushare-server` on loopback is measured idle (RSS, and an
honest buyer's WhoAmI round trips from a connection of its own: median and
p99); then a flooding process opens the hostile connections, a quarter of
each kind:

    idle      TLS handshake without a client certificate, greeting, silence
    keys      no certificate; one AMP box of 200,000 keys (2.4 MB)
    bigbox    no certificate; three values of 65,000 bytes of a box never
              finished (just under the box size limit), then silence
    pipeline  a registered account: Hello and 400 pipelined requests
              (WhoAmI, ListLeases, ListSellers, Ping), then it stops
              reading its socket, so that the answers pile up; the server
              lets one account hold 8 connections (its default
              --max-connections-per-account) and refuses the others at
              their Hello; --accounts N spreads them over N accounts,
              --accounts 0 sends them without a certificate

The connections come from 127.1.0.10 upwards, at most 12 from one address
(below the default cap of 16 connections before Hello per address); the server runs with its default limits, except a
--timeout long enough that the Hello deadline does not close them while
they are measured.  The server's RSS is measured once the flood is in
place, the honest buyer's round trips are measured again during it, then
the flood ends and the RSS is measured once more; then the same flood
runs a second time, to show that what the first released is reused (the
allocator keeps freed memory for the process rather than returning it to
the system).  Results go to bench/results/flood.json (with --accounts
above 1, bench/results/flood_accounts.json; with --accounts 0,
bench/results/flood_anonymous.json).
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import stats  # noqa: E402

KINDS = ("idle", "keys", "bigbox", "pipeline")
PER_ADDRESS = 12
PIPELINED = 400
RESULTS = stats.resultPath("flood")
RESULTS_ACCOUNTS = stats.resultPath("flood_accounts")
RESULTS_ANONYMOUS = stats.resultPath("flood_anonymous")


def emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


# -- the workers (child processes)


def _commands(reactor, handlers):
    from twisted.internet import defer, stdio
    from twisted.protocols.basic import LineReceiver

    closed = defer.Deferred()

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            handler = handlers.get(line.decode("ascii", "replace").strip())
            if handler is None:
                emit(event="error", error=f"unknown command {line!r}")
            else:
                handler()

        def connectionLost(self, reason):
            if not closed.called:
                closed.callback(None)

    stdio.StandardIO(Commands(), reactor=reactor)
    return closed


def hostilePayload(kind):
    from twisted.protocols import amp
    from cpushare.protocol import mux

    def control(data):
        return b"".join(mux.encode(0, data[i:i + mux.MAX_PAYLOAD])
                        for i in range(0, len(data), mux.MAX_PAYLOAD))

    if kind == "idle":
        return b""
    if kind == "keys":
        return control(b"\x00\x05kkkkk\x00\x01v" * 200_000)
    if kind == "bigbox":
        return control(b"".join(b"\x00\x02k%d" % i + b"\xfd\xe8" + b"v" * 65000
                                for i in range(3)))
    requests = []
    names = (b"WhoAmI", b"ListLeases", b"ListSellers", b"Ping")
    for i in range(PIPELINED):
        name = names[i % len(names)]
        box = {b"_command": name, b"_ask": b"%d" % (i + 2)}
        if name == b"ListSellers":
            box[b"offset"] = b"0"
        elif name == b"Ping":
            box[b"sent"] = b"1.0"
        requests.append(amp.AmpBox(box).serialize())
    hello = amp.AmpBox({b"_command": b"Hello", b"_ask": b"1", b"role": b"buyer",
                        b"software": b"flood/1"}).serialize()
    return control(hello + b"".join(requests))


def workerFlood(args):
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
    from twisted.internet.interfaces import IHandshakeListener
    from twisted.internet.protocol import Factory, Protocol
    from zope.interface import implementer

    from cpushare import pki
    from cpushare.client.home import Home
    from cpushare.protocol import mux

    credentials = [Home(home).credentials() for home in args.home]
    caPEM = credentials[0][0]
    payloads = {kind: hostilePayload(kind) for kind in KINDS}
    stats = {kind: {"opened": 0, "failed": 0, "closed_by_server": 0} for kind in KINDS}
    open_ = set()

    @implementer(IHandshakeListener)
    class Hostile(Protocol):
        def __init__(self, kind):
            self.kind = kind

        def handshakeCompleted(self):
            stats[self.kind]["opened"] += 1
            open_.add(self)
            self.transport.write(mux.greeting("flood/1") + payloads[self.kind])
            if self.kind == "pipeline":
                # Never read the answers: they pile up at the server.
                self.transport.pauseProducing()

        def dataReceived(self, data):
            pass

        def connectionLost(self, reason):
            if self in open_:
                open_.discard(self)
                if not stopping:
                    stats[self.kind]["closed_by_server"] += 1

    stopping = False

    def connect(i):
        kind = KINDS[i % len(KINDS)]
        if kind == "pipeline" and args.accounts:
            # The flood's accounts in turn.
            options = pki.clientTLS("localhost", *credentials[i // len(KINDS) % len(credentials)])
        else:
            options = pki.clientTLS("localhost", caPEM)
        # A different source address every PER_ADDRESS connections.
        source = f"127.{1 + i // PER_ADDRESS // 200}.0.{10 + i // PER_ADDRESS % 200}"
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", args.port, timeout=30,
                                 bindAddress=(source, 0))
        d = wrapClientTLS(options, tcp).connect(Factory.forProtocol(lambda: Hostile(kind)))

        def failed(f):
            stats[kind]["failed"] += 1
        return d.addErrback(failed)

    @defer.inlineCallbacks
    def run():
        started = time.monotonic()
        slots = defer.DeferredSemaphore(args.batch)
        yield defer.DeferredList([slots.run(connect, i) for i in range(args.count)])
        # Let the handshakes and payloads land.
        d = defer.Deferred()
        reactor.callLater(args.settle, d.callback, None)
        yield d
        emit(event="ready", open=len(open_), stats=stats,
             elapsed=time.monotonic() - started)

    def stop():
        nonlocal stopping
        stopping = True
        for p in list(open_):
            p.transport.abortConnection()
        emit(event="result", stats=stats)
        reactor.callLater(0.5, reactor.stop)

    def mark():
        emit(event="mark", open=len(open_), stats=stats)

    _commands(reactor, {"stop": stop, "mark": mark}).addCallback(
        lambda _: reactor.running and reactor.stop())
    reactor.callWhenRunning(run)
    reactor.run()


def workerProbe(args):
    from twisted.internet import defer, reactor

    from cpushare.client.home import Home
    from cpushare.client.session import connectOnce, endpointFor
    from cpushare.protocol import commands

    caPEM, keyPEM, certPEM = Home(args.home[0]).credentials()
    state = {}

    @defer.inlineCallbacks
    def start():
        try:
            state["session"] = yield connectOnce(
                reactor, endpointFor(reactor, "localhost", args.port, caPEM, keyPEM, certPEM),
                "buyer", host="localhost", port=args.port)
        except Exception as e:
            emit(event="error", error=str(e))
            reactor.stop()
            return
        emit(event="ready")

    @defer.inlineCallbacks
    def measure():
        session = state["session"]
        times, failed, slow = [], 0, []
        for i in range(args.count):
            t0 = time.perf_counter()
            try:
                yield session.control.callRemote(commands.WhoAmI)
            except Exception:
                failed += 1
                continue
            times.append((time.perf_counter() - t0) * 1000)
            if times[-1] > 100:
                slow.append([i, round(times[-1], 1)])
            d = defer.Deferred()
            reactor.callLater(args.interval, d.callback, None)
            yield d
        emit(event="result", count=len(times), failed=failed,
             median=stats.median(times), p99=stats.percentile(times, 99, "nearest"),
             max=max(times) if times else None, slow=slow)

    _commands(reactor, {"measure": lambda: measure(), "stop": reactor.stop}).addCallback(
        lambda _: reactor.running and reactor.stop())
    reactor.callWhenRunning(start)
    reactor.run()


# -- the benchmark


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("flood", "probe"))
    parser.add_argument("--home", action="append", help="(workers) a client's home folder")
    parser.add_argument("--port", type=int)
    parser.add_argument("--count", type=int, default=1000,
                        help="hostile connections (worker: connections or round trips)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--pings", type=int, default=200,
                        help="honest WhoAmI round trips per measurement")
    parser.add_argument("--accounts", type=int, default=1,
                        help="accounts the pipeline connections take turns with "
                             "(default 1; more write flood_accounts.json, "
                             "0 (no certificate) flood_anonymous.json)")
    parser.add_argument("--quick", action="store_true", help="100 connections, 50 round trips")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.worker == "flood":
        return workerFlood(args)
    if args.worker == "probe":
        return workerProbe(args)
    if args.quick:
        args.count, args.pings = 100, 50
    if args.out is None:
        args.out = {0: RESULTS_ANONYMOUS, 1: RESULTS}.get(args.accounts, RESULTS_ACCOUNTS)
    return bench(args)


def bench(args):
    from procs import BenchError, Children, memory, register, startServer

    tmp = tempfile.mkdtemp(prefix="cpushare-flood-")
    children = Children(tmp, clientMalloc=False)
    me = [sys.executable, os.path.abspath(__file__)]
    started = time.monotonic()

    def say(text):
        print(text, flush=True)

    try:
        data = os.path.join(tmp, "data")
        extra = ["--measure-every", "0", "--cpu-bench-every", "0", "--canary-every", "0",
                 "--heartbeat", "10", "--timeout", "300"]
        if args.accounts > 1:
            # The flood's accounts were made beforehand (over days, say).
            extra += ["--registrations-per-address", "0", "--registrations-per-minute", "0"]
        server, port = startServer(
            children, "flood-server", data,
            listen="tcp:0:interface=127.0.0.1:backlog=1024", extra=extra)
        honest = register(os.path.join(tmp, "home-honest"), port, data, "honest")
        names = ["flooder"] if args.accounts == 1 else \
            [f"flooder{n}" for n in range(args.accounts)]
        # Without accounts, the flood takes only the CA from the honest home.
        flooders = ["--accounts", str(args.accounts)]
        if not args.accounts:
            flooders += ["--home", honest]
        for name in names[:args.accounts]:
            flooders += ["--home", register(os.path.join(tmp, "home-" + name), port, data, name)]

        def startFlood(name):
            return children.spawn(name, me + [
                "--worker", "flood", *flooders, "--port", str(port),
                "--count", str(args.count), "--batch", str(args.batch),
                "--settle", str(args.settle)])

        def endFlood(flood):
            """Stop a flood; the server's memory once it has settled."""
            flood.request("stop", "result", timeout=30)
            flood.wait(30)
            time.sleep(3)
            return memory(server.pid)

        probe = children.spawn("probe", me + ["--worker", "probe", "--home", honest,
                                              "--port", str(port), "--count", str(args.pings),
                                              "--interval", str(args.interval)])
        probe.expect("ready", 60)
        time.sleep(2)
        before = memory(server.pid)
        idle = probe.request("measure", "result", timeout=120)
        say(f"flood: idle server RSS {before['VmRSS'] / 2**20:.1f} MiB; honest WhoAmI "
            f"median {idle['median']:.2f} ms, p99 {idle['p99']:.2f} ms")

        flood = startFlood("flood")
        ready = flood.expect("ready", 300)
        during0 = memory(server.pid)
        busy = probe.request("measure", "result", timeout=600)
        during = memory(server.pid)
        mark = flood.request("mark", "mark", timeout=30)
        say(f"flood: {ready['open']} hostile connections open after "
            f"{ready['elapsed']:.1f}s ({json.dumps(ready['stats'])}); server RSS "
            f"{during['VmRSS'] / 2**20:.1f} MiB; honest WhoAmI median {busy['median']:.2f} ms, "
            f"p99 {busy['p99']:.2f} ms")
        between = endFlood(flood)
        # The same flood again: the memory the first one released is reused.
        flood = startFlood("flood2")
        again = flood.expect("ready", 300)
        during2 = memory(server.pid)
        after = endFlood(flood)
        alive = server.alive()
        probe.request("measure", "result", timeout=120)
        say(f"flood: after the flood {between['VmRSS'] / 2**20:.1f} MiB; the same flood "
            f"again: {during2['VmRSS'] / 2**20:.1f} MiB, after it {after['VmRSS'] / 2**20:.1f}"
            f" MiB (still running: {alive})")
        probe.send("stop")
        probe.wait(30)
    finally:
        children.cleanup()
        if os.environ.get("CPUSHARE_BENCH_KEEP"):
            say(f"flood: kept {tmp}")
        else:
            shutil.rmtree(tmp, True)

    hostile = args.count
    growth = max(during["VmRSS"], during0["VmRSS"]) - before["VmRSS"]
    results = {
        "benchmark": "flood",
        "date": stats.now(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "hostile_connections_requested": hostile,
        "kinds": list(KINDS),
        "pipeline_accounts": args.accounts,
        "flood_ready": ready,
        "open_at_measurement": mark["open"],
        "server_rss_bytes": {"idle": before["VmRSS"], "flood": during["VmRSS"],
                             "flood_start": during0["VmRSS"], "after_flood": between["VmRSS"],
                             "second_flood": during2["VmRSS"], "after": after["VmRSS"]},
        "second_flood_ready": again,
        "server_anon_bytes": {"idle": before["RssAnon"], "flood": during["RssAnon"],
                              "after": after["RssAnon"]},
        "server_peak_rss_bytes": during["VmHWM"],
        "rss_per_hostile_connection_bytes": growth / hostile,
        "honest_whoami_ms": {"idle": idle, "flood": busy},
        "latency_ratio_median": busy["median"] / idle["median"] if idle["median"] else None,
        "latency_ratio_p99": busy["p99"] / idle["p99"] if idle["p99"] else None,
        "server_survived": alive,
        "seconds": time.monotonic() - started,
    }
    stats.write(args.out, results)
    say(f"flood: {growth / hostile / 1024:.1f} KiB of server RSS per hostile connection; "
        f"honest latency x{results['latency_ratio_median']:.2f} (median), "
        f"x{results['latency_ratio_p99']:.2f} (p99) during the flood; "
        f"{results['seconds']:.0f}s; written to {args.out}")
    if not alive:
        raise BenchError("the server died during the flood")


if __name__ == "__main__":
    main()
