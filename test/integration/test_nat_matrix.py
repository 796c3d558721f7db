"""
Direct paths between two sellers' ends through real NATs (test/natlab.py):
network namespaces, iptables MASQUERADE routers, the market's real
Rendezvous as the reflector, the real MeshPort and DirectPath in each end.

The lab's internet gives each access link DELAY ms each way, as a real one
does: Linux's MASQUERADE keeps a stale entry for a probe that reached the
router before its own end's first probe left, and then maps that end to a
new port, so two cone NATs punch only when both ends start within the time
a datagram takes between them (bench/natmatrix.py measures it,
docs/performance.md gives the figures).  With 50 ms a link, two ends that
start 100 ms apart on a busy machine still go direct.

Needs root (network namespaces, iptables); CI runs as root.  Namespaces are
named nb-PID-N-... and removed, with every process in them, even when a
test fails.
"""

import os

import pytest

from ..natlab import Lab

DELAY = 50
COUNT = 20

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (ip netns, iptables); CI runs as root")]


@pytest.fixture
def lab(tmp_path):
    labs = []

    def make(kinds, delay=DELAY):
        lab = Lab(f"nb-{os.getpid()}-{len(labs)}-", kinds, str(tmp_path), delay=delay)
        labs.append(lab)
        return lab.up()

    yield make
    for made in labs:
        made.close()


@pytest.fixture
def trials():
    started = []
    yield started
    for trial in started:
        trial.stop()


def dropped(stats):
    return sum(stats["drops"].values()) + stats["ignored"]


def test_two_cone_nats_go_direct(lab, trials):
    trial = lab(("cone", "cone")).trial()
    trials.append(trial)
    for result in trial.results:
        assert result["direct"], trial.results
        assert result["state"] == "direct"
        assert result["address_is"] == "public", trial.results
        assert result["seconds_to_direct"] < 10
    # Frames cross the path both ways: every echo came back.
    assert [len(r["ping_rtts_ms"]) for r in trial.results] == [10, 10], trial.results
    assert all(s["frames_received"] == 20 for s in trial.stats())


def test_two_symmetric_nats_fall_back_to_the_relay(lab, trials):
    trial = lab(("symmetric", "symmetric")).trial()
    trials.append(trial)
    for result in trial.results:
        assert not result["direct"], trial.results
        assert result["state"] == "relayed"
    assert all(s["frames_received"] == 0 for s in trial.stats())


def test_a_cone_nat_and_an_open_port_go_direct(lab, trials):
    trial = lab(("cone", "open")).trial()
    trials.append(trial)
    assert trial.direct, trial.results
    cone, opened = trial.results
    # Linux's MASQUERADE kept the port: the public candidate is where the path goes.
    assert cone["address_is"] == opened["address_is"] == "public", trial.results
    assert [len(r["ping_rtts_ms"]) for r in trial.results] == [10, 10], trial.results


def test_forged_datagrams_from_a_third_namespace_are_dropped_unanswered(lab, trials):
    net = lab(("cone", "open"))
    trial = net.trial()
    trials.append(trial)
    assert trial.direct, trial.results
    homePublic = tuple(trial.ready[0]["public"])
    openPublic = tuple(trial.ready[1]["public"])
    homeSession, openSession = trial.sessions
    before = trial.stats()

    # To the home's public NAT port from the attacker's own address: the
    # NAT lets nothing in that the home did not send to, nothing comes back.
    forged = net.forge(homePublic, homeSession, COUNT)
    assert forged == {"event": "forged", "sent": 2 * COUNT, "bytes_back": 0}
    after = trial.stats()
    assert dropped(after[0]) == dropped(before[0]), after

    # The same with the open peer's address as the source: through the hole
    # into the home's end, where every one is dropped and counted, none
    # delivered, none answered (the end sends no more than its keepalives).
    forged = net.forge(homePublic, homeSession, COUNT, spoof=openPublic)
    assert forged["bytes_back"] == 0
    spoofed = trial.stats()
    home = spoofed[0]
    assert dropped(home) - dropped(after[0]) == 2 * COUNT, home
    assert home["drops"].get("not authentic", 0) \
        - after[0]["drops"].get("not authentic", 0) == COUNT, home
    assert home["frames_received"] == after[0]["frames_received"]
    assert home["datagrams_sent"] - after[0]["datagrams_sent"] < COUNT
    assert home["state"] == "direct"

    # To the open port: every one reaches the end, is dropped and counted,
    # and the attacker gets 0 bytes back.
    forged = net.forge(openPublic, openSession, COUNT)
    assert forged["bytes_back"] == 0
    final = trial.stats()
    assert dropped(final[1]) - dropped(spoofed[1]) == 2 * COUNT, final
    assert final[1]["drops"].get("not authentic", 0) \
        - spoofed[1]["drops"].get("not authentic", 0) == COUNT, final
    assert final[1]["frames_received"] == spoofed[1]["frames_received"]
    assert final[1]["state"] == "direct"
