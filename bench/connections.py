"""
Benchmark 3: one server process holding many authenticated, idle seller
connections.

A fresh server is measured idle with no connections (the baseline: its RSS,
and its CPU over an idle window); then a load-generator process opens the
connections in bounded batches (each a TLS handshake with the account's
client certificate, Hello as a seller, Offer), and the same server is
measured again while they idle with heartbeats running both ways.
"""

import time

from procs import CPUWindow, memory

PROBE_PINGS = 200
PROBE_INTERVAL = 0.02


def probe(ctx, tag):
    """Control round trips to the server from one more connection."""
    child = ctx.children.worker(f"probe-{tag}", "probe", "--home", ctx.homes["seller"],
                                "--count", PROBE_PINGS, "--interval", PROBE_INTERVAL)
    try:
        result = child.expect("result", 60 + PROBE_PINGS * (PROBE_INTERVAL + 0.5))
        child.wait(30)
    finally:
        ctx.children.stop(child)
    return result["rtt_ms"]


def connections(ctx, count, batch, idleSeconds, settle):
    children = ctx.children
    server = ctx.connServer
    time.sleep(settle)

    before = memory(server.pid)
    window = CPUWindow({"server": server.pid})
    time.sleep(idleSeconds)
    idle0 = window.end()
    probe0 = probe(ctx, "idle")
    ctx.say(f"  no connections: RSS {before['VmRSS'] / 2**20:.1f} MiB, "
            f"server CPU {idle0['cpu_percent']['server']:.2f}% "
            f"(others {idle0['foreign_cpu_percent']:.0f}%); "
            f"Ping round trip median {probe0['median']:.2f} ms, p99 {probe0['p99']:.2f} ms")

    load = children.worker("conns", "conns", "--home", ctx.homes["seller"],
                           "--count", count, "--batch", batch,
                           "--progress", max(1, count // 5))
    try:
        started = time.monotonic()
        rampWindow = CPUWindow({"server": server.pid, "loadgen": load.pid})
        budget = 120 + count * 0.05
        while True:
            message = load.expect(("progress", "ready"), budget)
            if message["event"] == "ready":
                break
            ctx.say(f"  {message['connected']} connected "
                    f"({message['elapsed']:.1f}s, {message['failed']} failed)")
        ramp = rampWindow.end()
        ready = message
        ctx.say(f"  {ready['connected']} connected in {ready['elapsed']:.1f}s, "
                f"{ready['failed']} failed; the server lists {ready['sellers_listed']} sellers")
        time.sleep(settle)

        heldStart = memory(server.pid)
        startMark = load.request("mark", "mark")
        window = CPUWindow({"server": server.pid, "loadgen": load.pid})
        time.sleep(idleSeconds)
        idle1 = window.end()
        held = memory(server.pid)
        endMark = load.request("mark", "mark")
        probe1 = probe(ctx, "held")
        ctx.say(f"  {endMark['open']} idle connections: RSS {held['VmRSS'] / 2**20:.1f} MiB, "
                f"server CPU {idle1['cpu_percent']['server']:.2f}% "
                f"(others {idle1['foreign_cpu_percent']:.0f}%); "
                f"Ping round trip median {probe1['median']:.2f} ms, p99 {probe1['p99']:.2f} ms")

        view = load.request("sellers", "sellers", timeout=120)
        load.request("stop", "result", timeout=120)
        load.wait(120)
    finally:
        children.stop(load)
    time.sleep(settle)
    after = memory(server.pid)

    connected = ready["connected"]
    return {
        "connections_requested": count,
        "connections_held": connected,
        "connections_failed": ready["failed"],
        "failures": ready["failures"],
        "sellers_listed_by_server": ready["sellers_listed"],
        "connections_open_at_end": endMark["open"],
        "connections_lost_while_idle": endMark["lost"] - startMark["lost"],
        "connect_seconds": ready["elapsed"],
        "connects_per_second": connected / ready["elapsed"] if ready["elapsed"] else None,
        "connect_batch": batch,
        "ramp_cpu": ramp,
        "heartbeat_note": (
            "heartbeat round trips as the two ends measured them: each client's latest "
            "sample and the server's per-seller median of its last 16 samples.  They "
            "include time spent in the load generator, which handles all the "
            "connections in one process, and samples taken while connections were "
            "still being opened; held.ping_rtt_ms, from a separate process, is the "
            "server's own responsiveness"),
        "heartbeat_rtt_ms_client_latest": endMark["heartbeat_latest_ms"],
        "heartbeat_rtt_ms_server_view": view["latency_ms"],
        "sellers_listed_at_end": view["listed"],
        "baseline": {"memory": before, "idle": idle0, "ping_rtt_ms": probe0},
        "held": {"memory_start": heldStart, "memory": held, "idle": idle1,
                 "ping_rtt_ms": probe1},
        "after_close": {"memory": after},
        "rss_per_connection_bytes": (held["VmRSS"] - before["VmRSS"]) / connected
        if connected else None,
        "anon_per_connection_bytes": (held["RssAnon"] - before["RssAnon"]) / connected
        if connected else None,
        "server_cpu_percent_idle_baseline": idle0["cpu_percent"]["server"],
        "server_cpu_percent_idle_held": idle1["cpu_percent"]["server"],
        "loadgen_cpu_percent_idle_held": idle1["cpu_percent"]["loadgen"],
        "startup_seconds": time.monotonic() - started,
    }
