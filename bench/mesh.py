"""
The cost of the direct path's crypto (docs/performance.md, "The direct path
between sellers").

    .venv/bin/python bench/mesh.py [--seconds S] [--repeats N]

In this process, in CPU time, for 64-byte and 1500-byte frames:

  mesh      a datagram sealed (wire.Pair.seal) and opened (wire.Sessions.open:
            the checks, the key looked up by session id, ChaCha20-Poly1305,
            the replay window): what one seller's client spends on one frame
            sent direct, and the peer on receiving it
  chacha    the same payloads through cryptography's ChaCha20Poly1305 alone
            (encrypt then decrypt, a fixed nonce): the cipher's own cost
  aesgcm    the same through AESGCM: the other AEAD the issue allows
  copy      a plain copy of the payload: what a frame costs with no crypto

Each figure is the median of --repeats runs of --seconds each, the kinds
interleaved so that a noisy neighbour hurts them alike; the mesh's is also
given as a ratio of chacha's and aesgcm's.  Results go to
bench/results/mesh.json.  Nothing here asserts a speed.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import stats  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305  # noqa: E402

from cpushare.mesh import wire  # noqa: E402

BATCH = 500


def log(text):
    print(f"[mesh] {text}", flush=True)


def meshRound(size):
    secret = os.urandom(32)
    sender = wire.Pair(secret, 1, 2, 10, 20)
    sessions = wire.Sessions()
    sessions.add(wire.Pair(secret, 2, 1, 20, 10))
    frame = os.urandom(size)

    def run():
        for _ in range(BATCH):
            if sessions.open(sender.seal(wire.DATA, frame)) is None:
                raise RuntimeError(f"a sealed datagram did not open: {dict(sessions.drops)}")
    return run


def aeadRound(cipher, size):
    aead, nonce, frame, header = cipher(os.urandom(32)), os.urandom(12), os.urandom(size), b"h" * 16

    def run():
        for _ in range(BATCH):
            aead.decrypt(nonce, aead.encrypt(nonce, frame, header), header)
    return run


def copyRound(size):
    frame = os.urandom(size)

    def run():
        for _ in range(BATCH):
            bytes(bytearray(frame))
    return run


def perSecond(run, seconds):
    """Datagrams sealed and opened a second of CPU time, over C{seconds}."""
    done, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds:
        run()
        done += BATCH
    return done / (time.process_time() - t0)


def measure(sizes, seconds, repeats):
    kinds = {"mesh": meshRound, "chacha": lambda s: aeadRound(ChaCha20Poly1305, s),
             "aesgcm": lambda s: aeadRound(AESGCM, s), "copy": copyRound}
    result = {}
    for size in sizes:
        rounds = {kind: make(size) for kind, make in kinds.items()}
        figures = {kind: [] for kind in kinds}
        for _ in range(repeats):
            for kind, run in rounds.items():
                figures[kind].append(perSecond(run, seconds))
        medians = {kind: round(stats.median(values)) for kind, values in figures.items()}
        result[f"{size}B"] = {
            "per_second": medians,
            "runs": {kind: [round(v) for v in values] for kind, values in figures.items()},
            "mesh_vs_chacha": stats.ratio(medians["mesh"], medians["chacha"]),
            "mesh_vs_aesgcm": stats.ratio(medians["mesh"], medians["aesgcm"]),
            "mesh_MB_per_s": round(medians["mesh"] * size / 1e6, 1),
            "datagram_bytes": size + wire.OVERHEAD,
        }
        log(f"{size} B: mesh {medians['mesh']:,} sealed+opened/s "
            f"({result[f'{size}B']['mesh_MB_per_s']} MB/s), chacha {medians['chacha']:,}, "
            f"aesgcm {medians['aesgcm']:,}, copy {medians['copy']:,}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="64,1500")
    args = parser.parse_args(argv)
    result = {"when": stats.now(), "cpu": stats.cpuModel(), "git": stats.gitState(),
              "overhead_bytes": wire.OVERHEAD}
    try:
        result.update(measure([int(s) for s in args.sizes.split(",")], args.seconds,
                              args.repeats))
    except (RuntimeError, ValueError) as e:
        log(f"failed: {e}")
        return 1
    log(f"wrote {stats.write(stats.resultPath('mesh'), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
