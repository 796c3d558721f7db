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
"""

import argparse
import importlib.util
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.protocols import amp  # noqa: E402

from cpushare.protocol import mux  # noqa: E402


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Session(mux.Multiplexer):
    sessionId = 1

    def __init__(self, reactor):
        mux.Multiplexer.__init__(self, reactor)
        self.links = {}

    def makeControl(self):
        return amp.AMP()


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


def main():
    p = argparse.ArgumentParser(prog="bench/relaycost.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--other", required=True, help="another tree, holding cpushare/server/relay.py")
    p.add_argument("--rounds", type=int, default=60)
    args = p.parse_args()
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
