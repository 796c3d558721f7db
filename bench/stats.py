"""
Statistics and JSON results, shared by every benchmark in bench/.

Percentiles: each benchmark keeps the definition its published figures
were computed with (docs/performance.md says which), named here rather
than written again in each script:

    linear   interpolates between the two nearest values, as numpy does by
             default (bench/vms.py)
    nearest  the value at index round(p/100 * (n - 1)), ties to even
             (bench/market.py, bench/flood.py)
    rank     the nearest rank: the smallest value with at least p% of the
             values at or below it (bench/relay.py)
    above    the value at index floor(p/100 * n): the smallest value with
             more than p% of the values at or below it (bench/worker.py)

Results: every script writes one JSON document per benchmark with
L{write}, by default into bench/results/ (L{RESULTS}): indented, ending
with a newline, and written whole or not at all (a temporary file renamed
over the old one), so an interrupted run never leaves half a file.
"""

import datetime
import json
import math
import os
import statistics
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def _linear(ordered, p):
    k = (len(ordered) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _nearest(ordered, p):
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _rank(ordered, p):
    rank = max(1, min(len(ordered), math.ceil(p / 100.0 * len(ordered))))
    return ordered[rank - 1]


def _above(ordered, p):
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


METHODS = {"linear": _linear, "nearest": _nearest, "rank": _rank, "above": _above}


def percentile(values, p, method="linear"):
    """The C{p}-th percentile (0-100) of C{values} by C{method}; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return METHODS[method](ordered, p)


def median(values):
    """The median of C{values}; None when empty."""
    return statistics.median(values) if values else None


def summary(values, digits=3):
    """Count, median, mean, min, max and p99 (linear) of C{values}, rounded."""
    if not values:
        return {"n": 0}
    r = lambda v: round(v, digits)  # noqa: E731
    return {
        "n": len(values), "median": r(statistics.median(values)),
        "mean": r(statistics.fmean(values)), "min": r(min(values)), "max": r(max(values)),
        "p99": r(percentile(values, 99)),
    }


def ratio(a, b, digits=3):
    """C{a / b} rounded; None when either is missing (or C{b} is 0)."""
    return round(a / b, digits) if a is not None and b else None


def now():
    """The time now, UTC, ISO 8601 to the second: the date of a result."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpuModel():
    """The machine's CPU, as /proc/cpuinfo names it (None if it does not)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def gitState(tree=ROOT):
    """
    (short commit, whether cpushare/ has changes not committed) of the
    checkout at C{tree}, the code a result was measured with; (None, None)
    where git cannot tell.
    """
    def git(*args):
        return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "cpushare"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def resultPath(name, folder=RESULTS):
    """Where the result C{name} goes: FOLDER/NAME.json."""
    return os.path.join(folder, f"{name}.json")


def write(path, document):
    """Write C{document} as JSON to C{path} (its folder made if needed); returns C{path}."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path
