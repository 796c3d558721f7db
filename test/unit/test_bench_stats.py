"""
bench/stats.py: the percentile definitions the benchmarks' published
figures were computed with, and how results are written.
"""

import importlib.util
import json
import os
import random

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_stats", os.path.join(ROOT, "bench", "stats.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stats = _load()

TEN = [7, 1, 9, 3, 5, 10, 2, 8, 4, 6]


@pytest.mark.parametrize("method, p, expected", [
    # numpy's default: interpolated
    ("linear", 50, 5.5), ("linear", 90, 9.1), ("linear", 99, 9.91),
    # index round(p/100 * (n - 1)), ties to even: round(4.5) is 4
    ("nearest", 50, 5), ("nearest", 90, 9), ("nearest", 99, 10),
    # nearest rank: ceil(p/100 * n)
    ("rank", 50, 5), ("rank", 90, 9), ("rank", 99, 10),
    # index floor(p/100 * n)
    ("above", 50, 6), ("above", 90, 10), ("above", 99, 10),
])
def test_percentile_methods(method, p, expected):
    assert stats.percentile(TEN, p, method) == pytest.approx(expected)


def test_percentile_matches_the_definitions_it_replaced():
    """Each method gives what the benchmark's own helper gave, on any data."""
    import math

    def nearest(values, p):  # bench/market.py, bench/flood.py
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    def rank(values, p):  # bench/relay.py
        ordered = sorted(values)
        r = max(1, min(len(ordered), math.ceil(p / 100.0 * len(ordered))))
        return ordered[r - 1]

    def above(ordered, p):  # bench/worker.py, p a fraction, values sorted
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    def linear(values, p):  # bench/vms.py
        ordered = sorted(values)
        k = (len(ordered) - 1) * p / 100.0
        lo = int(k)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    rng = random.Random(3)
    for n in list(range(1, 40)) + [199, 200, 1000, 2000]:
        values = [rng.random() * 100 for _ in range(n)]
        for p in (0, 1, 50, 90, 99, 100):
            assert stats.percentile(values, p, "nearest") == nearest(values, p)
            assert stats.percentile(values, p, "rank") == rank(values, p)
            assert stats.percentile(values, p, "linear") == linear(values, p)
        for p in (50, 90, 99):
            assert stats.percentile(sorted(values), p, "above") == above(sorted(values), p / 100)


def test_empty():
    for method in stats.METHODS:
        assert stats.percentile([], 50, method) is None
    assert stats.median([]) is None
    assert stats.summary([]) == {"n": 0}
    assert stats.ratio(None, 2) is None and stats.ratio(1, 0) is None


def test_unknown_method():
    with pytest.raises(KeyError):
        stats.percentile(TEN, 50, "mean")


def test_summary_and_ratio():
    assert stats.summary([1.0, 2.0, 4.0]) == {
        "n": 3, "median": 2.0, "mean": 2.333, "min": 1.0, "max": 4.0, "p99": 3.96}
    assert stats.ratio(2, 3) == 0.667


def test_write(tmp_path):
    """The document whole, indented, with a newline at the end; no temporary left."""
    path = stats.resultPath("thing", str(tmp_path / "results"))
    assert path == str(tmp_path / "results" / "thing.json")
    assert stats.write(path, {"b": 1, "a": [1, 2]}) == path
    text = open(path).read()
    assert text == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    assert json.loads(text) == {"b": 1, "a": [1, 2]}
    assert os.listdir(tmp_path / "results") == ["thing.json"]


def test_results_folder():
    assert stats.RESULTS == os.path.join(ROOT, "bench", "results")
    assert stats.resultPath("flood") == os.path.join(ROOT, "bench", "results", "flood.json")


def test_git_state(tmp_path):
    """The commit a result was measured with; nothing where there is no checkout."""
    assert stats.gitState(str(tmp_path)) == (None, None)
    if not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    commit, modified = stats.gitState()
    assert commit and isinstance(modified, bool)
