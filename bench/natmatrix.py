"""
Direct-path success over the matrix of NAT kinds (docs/performance.md,
"Direct paths through NATs").  Needs root: it builds network namespaces
(named nb-PID-...) and removes them at the end, however the run ends.

    .venv/bin/python bench/natmatrix.py [--trials N] [--delays 0,10]
                                        [--kinds open,cone,restricted,symmetric]

An "internet" namespace with the market's real "where am I" answer path
(the Rendezvous, bench/natpeer.py reflect) and, for every unordered pair of
kinds, two sides each behind a router of one kind (test/netns.py,
test/natlab.py):

    open        no NAT: a public address and a fixed UDP port (--udp-port)
    cone        iptables MASQUERADE (Linux keeps the source port when free)
    restricted  cone, plus the router's own firewall: from the WAN only what
                belongs to a connection started inside, the rest dropped
    symmetric   MASQUERADE --random-fully: a new port per destination

Each trial runs one seller's end in each side (bench/natpeer.py end): the
real seller's MeshPort learns its public address from the reflector and
makes its candidates (public, local); both ends get the other's candidates
and one pair secret, as the market brokers them, and start a real
DirectPath at one moment (the start skew is recorded).  The baseline is two
ends in the internet's own namespace, no NAT: it must go direct every time.
Every cell is run at each --delays value: the one-way delay in ms of each
access link (two homes are twice that apart), 0 being the namespaces' own
few microseconds.  With --skew the second end starts that many ms after
the first, as two sellers at different distances from the market would.

How to read the results (bench/results/natmatrix.json, and the table
printed): for each delay and cell (the two kinds), "direct" is the share of
trials in which both ends went direct within the punching time (10 s,
path.PUNCH_FOR), else the path reports "relayed" and the frames would use
the market's relay; "to direct" the median seconds from the start to the
later end going direct; "RTT" the median round trip of frames echoed over
the direct path (ms); "address" which of the peer's addresses the path
took: its public candidate, its local candidate, or "other", a NAT port that
no candidate named (learned from where the peer's datagrams came from, as
through a symmetric NAT).  Nothing here asserts a rate.
"""

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import stats  # noqa: E402
from test import natlab  # noqa: E402


def log(text):
    print(f"[natmatrix] {text}", flush=True)


def parser():
    p = argparse.ArgumentParser(prog="bench/natmatrix.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5,
                   help="trials of each cell (default: 5)")
    p.add_argument("--delays", default="0,10",
                   help="one-way delays of each access link, in ms, comma-separated: the "
                        "matrix is run at each (default: 0,10)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="ms the second end starts after the first, as two sellers at "
                        "different distances from the market would (default: 0)")
    p.add_argument("--kinds", default=",".join(natlab.KINDS),
                   help=f"the kinds of the matrix (default: {','.join(natlab.KINDS)})")
    p.add_argument("--results", default=stats.RESULTS,
                   help="folder for the JSON results (default: bench/results)")
    return p


def cells(kinds):
    """The baseline, then every unordered pair of C{kinds}."""
    yield ("public", "public")
    for i, a in enumerate(kinds):
        for b in kinds[i:]:
            yield (a, b)


def trialRecord(trial):
    results = trial.results
    starts = [r["started_at"] for r in results]
    times = [r["seconds_to_direct"] for r in results]
    rtts = [x for r in results for x in r["ping_rtts_ms"]]
    return {
        "direct": trial.direct,
        "seconds_to_direct": max(times) if trial.direct else None,
        "start_skew_ms": round(abs(starts[0] - starts[1]) * 1000, 3),
        "ping_rtt_median_ms": round(statistics.median(rtts), 3) if rtts else None,
        "pings_answered": len(rtts), "pings_sent": sum(r["pings_sent"] for r in results),
        "ends": [{k: r[k] for k in ("direct", "seconds_to_direct", "state", "address",
                                    "address_is", "path_rtt_ms")} for r in results],
        "candidates": [r["candidates"] for r in trial.ready],
    }


def cellSummary(trials):
    direct = [t for t in trials if t["direct"]]
    addresses = {}
    for t in direct:
        for end in t["ends"]:
            addresses[end["address_is"]] = addresses.get(end["address_is"], 0) + 1
    return {
        "trials": len(trials),
        "direct": len(direct),
        "success_rate": round(len(direct) / len(trials), 3) if trials else None,
        "seconds_to_direct_median": stats.median([t["seconds_to_direct"] for t in direct]),
        "ping_rtt_median_ms": stats.median([t["ping_rtt_median_ms"] for t in direct
                                            if t["ping_rtt_median_ms"] is not None]),
        "start_skew_median_ms": stats.median([t["start_skew_ms"] for t in trials]),
        "addresses": addresses,
        "pings_lost": sum(t["pings_sent"] - t["pings_answered"] for t in direct),
    }


def runCell(kinds, delay, trials, logs, prefix, skew=0.0):
    lab = natlab.Lab(prefix, kinds, logs, delay=delay)
    records = []
    try:
        lab.up()
        for _ in range(trials):
            trial = lab.trial(skew)
            try:
                records.append(trialRecord(trial))
            finally:
                trial.stop()
    finally:
        lab.close()
    return {"kinds": list(kinds), "delay_ms": delay, "summary": cellSummary(records),
            "trials": records}


def table(matrix, kinds):
    """The matrix at one delay as text: success rates, then medians."""
    lines = []
    width = max(len(k) for k in kinds) + 2
    lines.append(" " * width + "".join(k.rjust(width) for k in kinds))
    bycell = {tuple(c["kinds"]): c["summary"] for c in matrix}
    for a in kinds:
        row = a.ljust(width)
        for b in kinds:
            s = bycell.get((a, b)) or bycell.get((b, a))
            row += (f"{s['direct']}/{s['trials']}" if s else "-").rjust(width)
        lines.append(row)
    return "\n".join(lines)


def describe(cell):
    s = cell["summary"]
    a, b = cell["kinds"]
    to = s["seconds_to_direct_median"]
    rtt = s["ping_rtt_median_ms"]
    return (f"{a}+{b}: direct {s['direct']}/{s['trials']}"
            + (f", to direct {to * 1000:.1f} ms" if to is not None else "")
            + (f", RTT {rtt:.2f} ms" if rtt is not None else "")
            + f", start skew {s['start_skew_median_ms']:.2f} ms"
            + (f", addresses {s['addresses']}" if s["addresses"] else ""))


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parser().parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for kind in kinds:
        if kind not in natlab.KINDS:
            raise SystemExit(f"bench/natmatrix.py: unknown kind {kind!r} "
                             f"(choose from {', '.join(natlab.KINDS)})")
    delays = [int(d) for d in args.delays.split(",")]
    if args.trials < 1:
        raise SystemExit("bench/natmatrix.py: --trials is at least 1")
    if os.geteuid() != 0:
        raise SystemExit("bench/natmatrix.py: needs root (ip netns, iptables)")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    logs = tempfile.mkdtemp(prefix="cpushare-natmatrix-")
    commit, dirty = stats.gitState()
    started = time.monotonic()
    log(f"{args.trials} trials a cell, delays {delays} ms, kinds {kinds}; logs in {logs}")
    matrices = {}
    baselineFailed = []
    for delay in delays:
        matrix = matrices[str(delay)] = []
        for n, pair in enumerate(cells(kinds)):
            cell = runCell(pair, delay, args.trials, logs, f"nb-{os.getpid()}-{n}-",
                           args.skew / 1000)
            matrix.append(cell)
            log(f"delay {delay} ms: " + describe(cell))
            if pair == ("public", "public") and cell["summary"]["success_rate"] != 1:
                baselineFailed.append(delay)
                log(f"THE BASELINE FAILED at {delay} ms: the lab, not a NAT, is broken")
        log(f"both ends direct, out of {args.trials}, with {delay} ms each access link:\n"
            + table([c for c in matrix if c["kinds"] != ["public", "public"]], kinds))
    path = stats.write(stats.resultPath("natmatrix", args.results), {
        "benchmark": "natmatrix",
        "description": __doc__.strip().split("\n\n")[-1],
        "parameters": {"trials": args.trials, "delays_ms": delays, "kinds": kinds,
                       "skew_ms": args.skew,
                       "punch_seconds": natlab.meshpath.PUNCH_FOR},
        "environment": {"date": stats.now(), "kernel": os.uname().release,
                        "cpu": stats.cpuModel(), "cpus": os.cpu_count(),
                        "loadavg": os.getloadavg(), "commit": commit,
                        "cpushare_modified": dirty},
        "elapsed_seconds": round(time.monotonic() - started, 1),
        "matrices": matrices,
    })
    log(f"-> {path} in {time.monotonic() - started:.0f}s")
    if baselineFailed:
        log(f"the logs are kept in {logs}")
        return 1
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
