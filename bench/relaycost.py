"""
The market server's own work per relayed frame, without TLS, in one
process: a seller's bytes parsed by its Multiplexer, routed through a
relay Link, queued on the buyer's Multiplexer and flushed to its
transport.  It compares the relay of this tree with the relay module of
another tree (--other, for instance a checkout of main), on a plain link
(LinkChannel) and on a metered VM link, interleaved, the best of many short
rounds: on a shared machine the best round is the one least disturbed.

    python bench/relaycost.py --other /path/to/main [--rounds 60]

The end-to-end throughput through TLS is bench/relay.py's; this one
isolates what per-link accounting adds to a frame.

With --instructions it counts instructions instead of timing, under
valgrind's callgrind: the same count for the same code whatever else the
machine does, so a change of a few percent shows.  Each case runs twice,
with FEW and MANY frames, in a process of its own; the difference over
MANY - FEW frames is the cost of one frame, start-up excluded.  Results go
to bench/results/relay_cost.json, which keeps the rows of the runs before
(under "previous", newest first), so a change's before and after stay
side by side.

    python bench/relaycost.py --instructions [--other /path/to/main]
"""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.protocols import amp  # noqa: E402

from cpushare.protocol import mux  # noqa: E402

import stats  # noqa: E402


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sessionClass(muxModule):
    """A market session of C{muxModule}'s Multiplexer: routes, links, AMP."""

    class Session(muxModule.Multiplexer):
        sessionId = 1

        def __init__(self, reactor):
            muxModule.Multiplexer.__init__(self, reactor)
            self.links = {}

        def makeControl(self):
            return amp.AMP()

    return Session


Session = sessionClass(mux)


def connected(clock):
    session = Session(clock)
    transport = StringTransport()
    session.makeConnection(transport)
    session._greeted = True
    return session, transport


def once(relay, blob, frames, metered):
    """Nanoseconds a frame, one round."""
    clock = Clock()
    seller, _ = connected(clock)
    buyer, buyerTransport = connected(clock)
    link = relay.Relay().link(seller, 1, buyer, 1)
    if metered:
        link.meter(10**15, lambda: None)
    chunk = 16384
    started = time.perf_counter()
    for i in range(0, len(blob), chunk):
        seller.dataReceived(blob[i:i + chunk])
        clock.advance(0)
        buyerTransport.clear()
    elapsed = time.perf_counter() - started
    assert link.framesAB == frames, (link.framesAB, frames)
    return elapsed / frames * 1e9


FEW, MANY = 2_000, 12_000
KEEP = 4        # earlier runs kept in the results


def oneRun(tree, size, frames, metered):
    """Relay C{frames} frames through the multiplexer and relay of C{tree}, once."""
    global mux, Session
    for name in [n for n in sys.modules if n == "cpushare" or n.startswith("cpushare.")]:
        del sys.modules[name]
    sys.path.insert(0, tree)
    from cpushare.protocol import mux
    from cpushare.server import relay
    assert relay.__file__.startswith(tree), relay.__file__
    Session = sessionClass(mux)

    blob = (mux.HEADER.pack(1, size) + b"x" * size) * frames
    once(relay, blob, frames, metered)


def instructions(tree, size, frames, metered):
    """Instructions callgrind counts for L{oneRun} in a process of its own."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--run-one", tree, str(size), str(frames), str(int(metered))],
        capture_output=True, text=True, check=True,
        # A fixed hash seed: the same dict layouts, so the same count every run.
        env={**os.environ, "PYTHONHASHSEED": "0"}).stderr
    return int(re.search(r"Collected : (\d+)", out).group(1))


def countInstructions(args):
    this = os.path.dirname(HERE)
    trees = [("this", this)] + ([("other", os.path.abspath(args.other))] if args.other else [])
    rows = []
    for size in (64, 1500):
        for label, tree in trees:
            hasMeter = "def meter(" in open(os.path.join(tree, "cpushare/server/relay.py")).read()
            for metered in (False, True) if hasMeter else (False,):
                few = instructions(tree, size, FEW, metered)
                many = instructions(tree, size, MANY, metered)
                rows.append({"tree": label, "size": size, "metered": metered,
                             "instructions_per_frame": round((many - few) / (MANY - FEW))})
    base = {(r["tree"], r["size"]): r["instructions_per_frame"]
            for r in rows if not r["metered"]}
    for r in rows:
        # Against this tree's plain link; and against the other tree's, when given.
        r["ratio_to_plain"] = round(r["instructions_per_frame"] / base[("this", r["size"])], 4)
        if args.other:
            r["ratio_to_other"] = round(
                r["instructions_per_frame"] / base[("other", r["size"])], 4)
        print(f"{r['size']:5d} B {r['tree']:5s} {'metered' if r['metered'] else 'plain':7s}"
              f" {r['instructions_per_frame']:7d} instructions a frame"
              + "".join(f", {k} {v:.3f}" for k, v in r.items() if k.startswith("ratio")))
    path = stats.resultPath("relay_cost")
    try:
        with open(path) as f:
            last = json.load(f)
        previous = [{k: last.get(k) for k in ("date", "commit", "cpushare_modified", "other",
                                              "rows")}] + last.get("previous", [])
    except (OSError, ValueError):
        previous = []
    commit, dirty = stats.gitState(this)
    stats.write(path, {
        "benchmark": "relay_cost", "date": stats.now(), "commit": commit,
        "cpushare_modified": dirty, "frames": [FEW, MANY], "other": args.other, "rows": rows,
        "previous": previous[:KEEP]})


def main():
    if sys.argv[1:2] == ["--run-one"]:
        tree, size, frames, metered = sys.argv[2:6]
        return oneRun(tree, int(size), int(frames), metered == "1")
    p = argparse.ArgumentParser(prog="bench/relaycost.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--other", help="another tree, holding cpushare/server/relay.py")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--instructions", action="store_true",
                   help="count instructions under callgrind instead of timing")
    args = p.parse_args()
    if args.instructions:
        return countInstructions(args)
    if not args.other:
        p.error("--other is needed to time against another tree")
    other = load(os.path.join(args.other, "cpushare", "server", "relay.py"), "relay_other")
    this = load(os.path.join(os.path.dirname(HERE), "cpushare", "server", "relay.py"),
                "relay_this")
    cases = [("other", other, False), ("this", this, False)]
    if hasattr(this.Link, "meter"):
        cases.append(("this, metered", this, True))
    for size, frames in ((64, 20_000), (1500, 8_000)):
        blob = (mux.HEADER.pack(1, size) + b"x" * size) * frames
        best = {}
        for _ in range(args.rounds):
            for label, relay, metered in cases:
                best[label] = min(best.get(label, 1e9), once(relay, blob, frames, metered))
        base = best["other"]
        print(f"{size:5d} B: " + "; ".join(
            f"{label} {ns:.0f} ns/frame ({ns / base:.3f})" for label, ns in best.items()))


if __name__ == "__main__":
    main()
