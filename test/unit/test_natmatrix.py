"""
The NAT matrix's pure parts (bench/natmatrix.py, test/netns.py): which
cells it runs, how a cell's trials are summed up, and the iptables rules of
each kind of NAT.  The namespaces themselves are exercised by
test/integration/test_nat_matrix.py.
"""

import os
import runpy
import types

import pytest

from test.netns import natRules

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
natmatrix = types.SimpleNamespace(**runpy.run_path(os.path.join(ROOT, "bench", "natmatrix.py")))


def trial(direct, seconds=None, skew=0.1, rtt=None, answered=0, sent=0, where=None):
    return {"direct": direct, "seconds_to_direct": seconds, "start_skew_ms": skew,
            "ping_rtt_median_ms": rtt, "pings_answered": answered, "pings_sent": sent,
            "ends": [{"address_is": where}, {"address_is": where}]}


def test_the_matrix_is_the_baseline_and_every_unordered_pair():
    cells = list(natmatrix.cells(["open", "cone", "restricted", "symmetric"]))
    assert cells[0] == ("public", "public")
    assert len(cells) == 1 + 10
    assert len({frozenset(c) for c in cells[1:]}) == 10
    assert ("cone", "cone") in cells and ("symmetric", "cone") not in cells


def test_a_cell_counts_only_trials_where_both_ends_went_direct():
    summary = natmatrix.cellSummary([
        trial(True, 0.02, rtt=40.0, answered=20, sent=20, where="public"),
        trial(False),
        trial(True, 0.04, rtt=42.0, answered=19, sent=20, where="other"),
    ])
    assert (summary["direct"], summary["trials"], summary["success_rate"]) == (2, 3, 0.667)
    assert summary["seconds_to_direct_median"] == pytest.approx(0.03)
    assert summary["ping_rtt_median_ms"] == pytest.approx(41.0)
    assert summary["addresses"] == {"public": 2, "other": 2}
    assert summary["pings_lost"] == 1


def test_a_cell_with_no_direct_trial_has_no_times():
    summary = natmatrix.cellSummary([trial(False), trial(False)])
    assert summary["success_rate"] == 0
    assert summary["seconds_to_direct_median"] is None
    assert summary["ping_rtt_median_ms"] is None


def test_the_table_shows_each_unordered_cell_both_ways():
    matrix = [{"kinds": ["cone", "symmetric"], "summary": {"direct": 0, "trials": 5}},
              {"kinds": ["cone", "cone"], "summary": {"direct": 4, "trials": 5}}]
    lines = natmatrix.table(matrix, ["cone", "symmetric"]).splitlines()
    assert lines[1].split() == ["cone", "4/5", "0/5"]
    assert lines[2].split() == ["symmetric", "0/5", "-"]


def test_each_kind_of_nat_has_its_rules():
    assert natRules("cone", "wan0") == [
        ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE"]]
    assert natRules("symmetric", "wan0")[0][-1] == "--random-fully"
    restricted = natRules("restricted", "wan0")
    assert restricted[0] == natRules("cone", "wan0")[0]
    # Only what belongs to a connection from inside comes in; the rest is dropped.
    for chain in ("INPUT", "FORWARD"):
        rules = [r for r in restricted if chain in r]
        assert rules[0][-1] == "ACCEPT" and "ESTABLISHED,RELATED" in rules[0]
        assert rules[1][-2:] == ["-j", "DROP"]


def test_an_unknown_kind_of_nat_is_named():
    with pytest.raises(ValueError, match="unknown NAT kind 'full-cone'"):
        natRules("full-cone", "wan0")
