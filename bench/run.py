"""
The CPUShare benchmarks (`make bench`; pass options with BENCH_ARGS).

    relay        relay throughput through the real server process, against a
                 single TLS hop between two processes (the baseline)
    latency      the latency the relay hop adds at light load, against the
                 same single hop
    connections  one server holding thousands of idle authenticated seller
                 connections: memory per connection and idle CPU, against
                 the same server with no connections

Everything runs as real processes on 127.0.0.1 and is stopped at the end,
however the run ends.  Results go to bench/results/<benchmark>.json and
bench/results/summary.json; docs/performance.md explains them.  The
benchmarks only measure: no speed makes them fail.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import connections as connectionsBench  # noqa: E402
import relay as relayBench  # noqa: E402
import stats  # noqa: E402
from procs import BenchError, Children, register, startServer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BENCHMARKS = ("relay", "latency", "connections")

TARGETS = {
    "relay_megabytes_per_second_1500": 80.0,
    "relay_frames_per_second_64": 150000.0,
    "added_latency_median_ms": 1.0,
    "memory_per_connection_bytes": 64 * 1024,
    "connections": 5000,
}


def parser():
    p = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--quick", action="store_true",
                   help="short runs and 1000 connections: a smoke test, not a measurement "
                        "(explicit options below still win)")
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help="comma-separated benchmarks to run (default: all of "
                        + ", ".join(BENCHMARKS) + ")")
    p.add_argument("--results", default=stats.RESULTS,
                   help="folder for the JSON results (default: bench/results)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary folder (data, homes, logs) after the run")
    p.add_argument("--client-malloc", choices=("tuned", "default"), default="tuned",
                   help="glibc malloc settings of the client processes (never the "
                        "server's): 'tuned' keeps a bulk sender out of page faults; "
                        "'default' runs them as shipped (default: tuned)")
    g = p.add_argument_group("relay throughput")
    g.add_argument("--sizes", default="1500,64",
                   help="frame payload sizes in bytes (default: 1500,64)")
    g.add_argument("--seconds", type=float, default=None,
                   help="measured window of each run (default 5, quick 2)")
    g.add_argument("--warmup", type=float, default=None,
                   help="seconds of traffic before the window (default 1.5, quick 1)")
    g.add_argument("--repeats", type=int, default=None,
                   help="runs of each size and mode, interleaved (default 3, quick 1)")
    g.add_argument("--retries", type=int, default=1,
                   help="reruns of a run that other processes disturbed (default: 1)")
    g.add_argument("--foreign-limit", type=float, default=25.0,
                   help="CPU (%% of one core) used by processes other than the "
                        "benchmark's above which a run counts as disturbed (default: 25)")
    g = p.add_argument_group("latency")
    g.add_argument("--pings", type=int, default=None,
                   help="round trips per path and size (default 2000, quick 300)")
    g.add_argument("--ping-sizes", default="64,1500",
                   help="frame payload sizes in bytes (default: 64,1500)")
    g.add_argument("--ping-interval", type=float, default=0.002,
                   help="pause after each round trip, in seconds: light load (default: 0.002)")
    g = p.add_argument_group("connections")
    g.add_argument("--connections", type=int, default=None,
                   help="seller connections to hold (default 5000, quick 1000)")
    g.add_argument("--batch", type=int, default=100,
                   help="connection attempts in flight at once (default: 100)")
    g.add_argument("--idle", type=float, default=None,
                   help="seconds of each idle CPU measurement (default two heartbeat "
                        "intervals, 20; quick one, 10)")
    g.add_argument("--heartbeat", type=float, default=None,
                   help="the server's heartbeat interval in seconds (default: the "
                        "server's default, 10)")
    return p


def defaults(args):
    quick = args.quick
    for name, full, short in (
        ("seconds", 5.0, 2.0), ("warmup", 1.5, 1.0), ("repeats", 3, 1),
        ("pings", 2000, 300), ("connections", 5000, 1000),
    ):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    if args.idle is None:
        # A whole number of heartbeat intervals, so that every connection
        # beats as often in the window as it does on average.
        from cpushare.protocol.heartbeat import DEFAULT_INTERVAL
        args.idle = (args.heartbeat or DEFAULT_INTERVAL) * (1 if quick else 2)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    for b in args.only:
        if b not in BENCHMARKS:
            raise SystemExit(f"bench/run.py: unknown benchmark {b!r} "
                             f"(choose from {', '.join(BENCHMARKS)})")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.ping_sizes = [int(s) for s in args.ping_sizes.split(",")]
    return args


def environment():
    def version(module):
        try:
            return __import__(module).__version__
        except Exception:
            return None

    from OpenSSL import SSL

    commit, dirty = stats.gitState()
    return {
        "date": stats.now(),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": stats.cpuModel(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "twisted": version("twisted"),
        "pyopenssl": version("OpenSSL"),
        "cryptography": version("cryptography"),
        "openssl": SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode(),
        "commit": commit,
        "cpushare_modified": dirty,
        "loadavg": os.getloadavg(),
    }


class Context:
    """What the benchmarks share: processes, folders, accounts, servers."""

    def __init__(self, tmp, children):
        self.tmp = tmp
        self.children = children
        self.homes = {}
        self.relayServer = None
        self.relayData = None
        self.connServer = None
        self._ids = 0

    def nextId(self):
        self._ids += 1
        return self._ids

    def say(self, text):
        print(text, flush=True)


def raiseFileLimit(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def runRelayBenchmarks(ctx, args, env, summary):
    ctx.relayData = os.path.join(ctx.tmp, "relay-server")
    ctx.say("starting the market server for the relay benchmarks")
    ctx.relayServer, port = startServer(ctx.children, "relay-server", ctx.relayData)
    home = register(os.path.join(ctx.tmp, "home-bench"), port, ctx.relayData, "bench")
    # The sender and the receiver are two connections of one account (the
    # relay links channels within an account).
    ctx.homes["sender"] = ctx.homes["receiver"] = home

    if "relay" in args.only:
        ctx.say(f"relay throughput: {args.repeats} x {args.seconds:g}s windows per size "
                f"and mode, after {args.warmup:g}s of warm-up")
        started = time.monotonic()
        results = relayBench.throughput(ctx, args.sizes, args.warmup, args.seconds,
                                        args.repeats, args.retries, args.foreign_limit)
        s = results["summary"]
        headline = {}
        for size, entry in s.items():
            relay, direct = entry["relay"], entry["direct"]
            ctx.say(f"  {size:>5} B, medians of {relay['runs']}: relay "
                    f"{relay['frames_per_second']:.0f} frames/s "
                    f"{relay['megabytes_per_second']:.1f} MB/s (runs "
                    f"{relay['frames_per_second_min']:.0f}-{relay['frames_per_second_max']:.0f}), "
                    f"direct {direct['frames_per_second']:.0f} frames/s "
                    f"{direct['megabytes_per_second']:.1f} MB/s (runs "
                    f"{direct['frames_per_second_min']:.0f}-{direct['frames_per_second_max']:.0f}), "
                    f"ratio {entry['ratio_relay_to_direct']:.2f}")
            headline[size] = {
                "relay_frames_per_second": entry["relay"]["frames_per_second"],
                "relay_megabytes_per_second": entry["relay"]["megabytes_per_second"],
                "direct_frames_per_second": entry["direct"]["frames_per_second"],
                "direct_megabytes_per_second": entry["direct"]["megabytes_per_second"],
                "ratio_relay_to_direct": entry["ratio_relay_to_direct"],
                "relay_dropped_percent": entry["relay"]["dropped_percent"],
            }
        if "1500" in s:
            headline["1500"]["target_megabytes_per_second"] = \
                TARGETS["relay_megabytes_per_second_1500"]
            headline["1500"]["meets_target"] = (
                s["1500"]["relay"]["megabytes_per_second"]
                >= TARGETS["relay_megabytes_per_second_1500"])
        if "64" in s:
            headline["64"]["target_frames_per_second"] = TARGETS["relay_frames_per_second_64"]
            headline["64"]["meets_target"] = (
                s["64"]["relay"]["frames_per_second"]
                >= TARGETS["relay_frames_per_second_64"])
        summary["relay_throughput"] = headline
        path = stats.write(stats.resultPath("relay_throughput", args.results), {
            "benchmark": "relay_throughput",
            "description": relayBench.__doc__.strip().split("\n\n")[1],
            "units": {"megabytes_per_second": "10^6 bytes of frame payload per second, "
                                              "counted at the receiver",
                      "frames_per_second": "frames counted at the receiver"},
            "parameters": {"sizes": args.sizes, "warmup_seconds": args.warmup,
                           "window_seconds": args.seconds, "repeats": args.repeats,
                           "client_malloc": clientMalloc(args)},
            "environment": env,
            "elapsed_seconds": time.monotonic() - started,
            "summary": s,
            "runs": results["runs"],
            "discarded_runs": results["discarded_runs"],
        })
        ctx.say(f"  -> {path}")

    if "latency" in args.only:
        ctx.say(f"relay latency: {args.pings} round trips per path and size, "
                f"{args.ping_interval * 1000:g} ms apart")
        started = time.monotonic()
        discarded = []
        for attempt in range(args.retries + 1):
            results = relayBench.latency(ctx, args.ping_sizes, args.pings, 50,
                                         args.ping_interval)
            foreign = results["cpu"]["foreign_cpu_percent"]
            results["disturbed"] = foreign > args.foreign_limit
            if not results["disturbed"] or attempt == args.retries:
                break
            ctx.say(f"  other processes used {foreign:.0f}% of a core: DISTURBED, again")
            discarded.append(results)
        results["discarded_runs"] = discarded
        headline = {}
        for size, entry in results["by_size"].items():
            headline[size] = {
                "added_one_way_median_ms": entry["added_one_way_median_ms"],
                "added_one_way_p99_ms": entry["added_one_way_p99_ms"],
                "added_one_way_paired_median_ms": entry["added_one_way_paired"]["median_ms"],
                "added_one_way_paired_p99_ms": entry["added_one_way_paired"]["p99_ms"],
                "relay_rtt_median_ms": entry["relay_rtt"]["median_ms"],
                "direct_rtt_median_ms": entry["direct_rtt"]["median_ms"],
                "relay_rtt_p99_ms": entry["relay_rtt"]["p99_ms"],
                "direct_rtt_p99_ms": entry["direct_rtt"]["p99_ms"],
                "target_added_median_ms": TARGETS["added_latency_median_ms"],
                "meets_target": entry["added_one_way_median_ms"]
                < TARGETS["added_latency_median_ms"],
            }
            ctx.say(f"  {size:>5} B: relay RTT median {entry['relay_rtt']['median_ms']:.3f} ms "
                    f"p99 {entry['relay_rtt']['p99_ms']:.3f} ms; direct RTT median "
                    f"{entry['direct_rtt']['median_ms']:.3f} ms p99 "
                    f"{entry['direct_rtt']['p99_ms']:.3f} ms; added one-way median "
                    f"{entry['added_one_way_median_ms']:.3f} ms p99 "
                    f"{entry['added_one_way_p99_ms']:.3f} ms")
        ctx.say(f"  (others used {results['cpu']['foreign_cpu_percent']:.0f}% of a core)")
        summary["relay_latency"] = headline
        path = stats.write(stats.resultPath("relay_latency", args.results), {
            "benchmark": "relay_latency",
            "description": relayBench.__doc__.strip().split("\n\n")[2],
            "parameters": {"client_malloc": clientMalloc(args),
                           "sizes": args.ping_sizes, "round_trips": args.pings,
                           "warmup_round_trips": 50,
                           "interval_seconds": args.ping_interval},
            "environment": env,
            "elapsed_seconds": time.monotonic() - started,
            "results": results,
        })
        ctx.say(f"  -> {path}")

    ctx.children.stop(ctx.relayServer)
    ctx.relayServer = None


def runConnectionBenchmark(ctx, args, env, summary):
    limit = raiseFileLimit(args.connections + 4096)
    if limit < args.connections + 100:
        raise BenchError(f"cannot raise the open-file limit above {limit} "
                         f"for {args.connections} connections")
    data = os.path.join(ctx.tmp, "conn-server")
    extra = ["--heartbeat", str(args.heartbeat)] if args.heartbeat else []
    # Idle connections only: no bandwidth measurements, CPU benchmark or canary VMs
    # (scheduled work, a few of each at once; see docs/performance.md).
    extra += ["--measure-every", "0", "--cpu-bench-every", "0", "--canary-every", "0"]
    # Every connection comes from 127.0.0.1, a batch of them in their TLS
    # handshakes at once: more than one address may hold before Hello.
    extra += ["--max-unauthenticated-per-address", str(max(16, 2 * args.batch))]
    # And every connection is the one account's: more than an account may hold.
    extra += ["--max-connections-per-account", str(args.connections + 16)]
    ctx.say(f"connections: {args.connections} seller connections, {args.batch} at a time, "
            f"{args.idle:g}s idle windows")
    started = time.monotonic()
    ctx.connServer, port = startServer(
        ctx.children, "conn-server", data,
        listen="tcp:0:interface=127.0.0.1:backlog=1024", extra=extra,
    )
    ctx.homes["seller"] = register(os.path.join(ctx.tmp, "home-seller"), port, data, "seller")
    try:
        results = connectionsBench.connections(ctx, args.connections, args.batch,
                                               args.idle, settle=3.0)
    finally:
        ctx.children.stop(ctx.connServer)
        ctx.connServer = None
    perConn = results["rss_per_connection_bytes"]
    ctx.say(f"  RSS per connection {perConn / 1024:.1f} KiB; idle server CPU "
            f"{results['server_cpu_percent_idle_held']:.2f}% with connections, "
            f"{results['server_cpu_percent_idle_baseline']:.2f}% without")
    from cpushare.protocol.heartbeat import DEFAULT_INTERVAL, DEFAULT_TIMEOUT
    summary["connections"] = {
        "connections_held": results["connections_held"],
        "rss_per_connection_kib": perConn / 1024 if perConn is not None else None,
        "server_cpu_percent_idle_held": results["server_cpu_percent_idle_held"],
        "server_cpu_percent_idle_baseline": results["server_cpu_percent_idle_baseline"],
        "heartbeat_seconds": args.heartbeat or DEFAULT_INTERVAL,
        "connects_per_second": results["connects_per_second"],
        "ping_rtt_median_ms_idle_baseline": results["baseline"]["ping_rtt_ms"]["median"],
        "ping_rtt_median_ms_idle_held": results["held"]["ping_rtt_ms"]["median"],
        "ping_rtt_p99_ms_idle_held": results["held"]["ping_rtt_ms"]["p99"],
        "target_rss_per_connection_kib": TARGETS["memory_per_connection_bytes"] / 1024,
        "meets_target": (
            results["connections_held"] >= TARGETS["connections"]
            and perConn is not None and perConn <= TARGETS["memory_per_connection_bytes"]
        ),
    }
    path = stats.write(stats.resultPath("connections", args.results), {
        "benchmark": "connections",
        "description": connectionsBench.__doc__.strip(),
        "parameters": {"client_malloc": clientMalloc(args),
                       "connections": args.connections, "batch": args.batch,
                       "idle_seconds": args.idle,
                       "heartbeat_seconds": args.heartbeat or DEFAULT_INTERVAL,
                       "heartbeat_timeout_seconds": DEFAULT_TIMEOUT,
                       "listen": "tcp:0:interface=127.0.0.1:backlog=1024"},
        "environment": env,
        "elapsed_seconds": time.monotonic() - started,
        "results": results,
    })
    ctx.say(f"  -> {path}")


def clientMalloc(args):
    from procs import CLIENT_MALLOC
    return CLIENT_MALLOC if args.client_malloc == "tuned" else "default"


def writeSummary(args, env, summary, complete, elapsed):
    """
    bench/results/summary.json: the headline figures of each benchmark, from
    the latest run that ran it (a run of some benchmarks keeps the others'
    entries; each entry says when and how it was measured).
    """
    path = stats.resultPath("summary", args.results)
    try:
        with open(path) as f:
            results = json.load(f).get("results", {})
    except (OSError, ValueError):
        results = {}
    for name, entry in summary.items():
        results[name] = dict(entry, measured=env["date"], quick=args.quick,
                             commit=env["commit"])
    return stats.write(path, {
        "latest_run": {"date": env["date"], "benchmarks": args.only, "quick": args.quick,
                       "complete": complete, "elapsed_seconds": elapsed},
        "environment": env,
        "targets": TARGETS,
        "results": results,
    })


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    args = defaults(parser().parse_args(argv))
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    tmp = tempfile.mkdtemp(prefix="cpushare-bench-")
    logs = os.path.join(tmp, "logs")
    os.makedirs(logs)
    children = Children(logs, clientMalloc=args.client_malloc == "tuned")
    ctx = Context(tmp, children)
    env = environment()
    summary = {}
    started = time.monotonic()
    ok = False
    ctx.say(f"cpushare benchmarks: {', '.join(args.only)}"
            f"{' (quick)' if args.quick else ''}; working folder {tmp}")
    try:
        if "relay" in args.only or "latency" in args.only:
            runRelayBenchmarks(ctx, args, env, summary)
        if "connections" in args.only:
            runConnectionBenchmark(ctx, args, env, summary)
        ok = True
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        for server in (ctx.relayServer, ctx.connServer):
            if server is not None and not server.alive():
                print(f"bench: the market server {server.name} (pid {server.pid}) had "
                      f"exited with status {server.popen.returncode}; its log: "
                      f"{server.logPath}", file=sys.stderr)
    finally:
        children.cleanup()
        if summary:
            path = writeSummary(args, env, summary, ok, time.monotonic() - started)
            ctx.say(f"summary -> {path}")
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            ctx.say(f"the working folder (logs, data) is kept in {tmp}")
    ctx.say(f"done in {time.monotonic() - started:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
