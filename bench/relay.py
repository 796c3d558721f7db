"""
Benchmarks 1 and 2: relay throughput and the latency the relay hop adds.

Throughput: a sender process pumps frames of one size on channel 1 as fast
as its connection takes them; a receiver process counts the frames that
arrive.  Relay: sender -> market server -> receiver, three processes, the
channel linked with LinkChannel.  Direct (the baseline): the sender's
frames go over one TLS hop straight to the receiver, which listens with the
market's own certificate and TLS settings and runs the same multiplexer.
Rates are frames (and payload bytes) counted at the receiver over a
measured window after a warm-up; the relay's drops come from LinkStats.

Latency: a pinger sends one frame and waits for it to come back from an
echo process, alternating the relay path (pinger -> server -> echo ->
server -> pinger) with the direct path (pinger -> echo -> pinger); the
relay hop's added one-way latency is half the difference of the round
trips.
"""

import statistics
import time

from procs import CPUWindow
from stats import median
from stats import percentile


def throughputOnce(ctx, mode, size, warmup, seconds):
    """One run of one mode and frame size; returns its figures."""
    children = ctx.children
    tag = f"{mode}-{size}-{ctx.nextId()}"
    recvArgs = ["recv", "--home", ctx.homes["receiver"], "--mode", mode]
    if mode == "direct":
        recvArgs += ["--data", ctx.relayData]
    recv = children.worker(f"recv-{tag}", *recvArgs)
    send = None
    try:
        ready = recv.expect("ready", 60)
        sendArgs = ["send", "--home", ctx.homes["sender"], "--mode", mode, "--size", size]
        if mode == "relay":
            sendArgs += ["--peer", ready["session"]]
        else:
            sendArgs += ["--port", ready["port"]]
        send = children.worker(f"send-{tag}", *sendArgs)
        send.expect("ready", 60)
        send.send("go")
        time.sleep(warmup)

        pids = {"sender": send.pid, "receiver": recv.pid}
        if mode == "relay":
            pids["server"] = ctx.relayServer.pid
        window = CPUWindow(pids)
        marks = [(recv.request("mark", "mark"), send.request("mark", "mark"))]
        for _ in range(max(1, round(seconds))):
            time.sleep(seconds / max(1, round(seconds)))
            marks.append((recv.request("mark", "mark"), send.request("mark", "mark")))
        cpu = window.end()

        sent = send.request("stop", "result", timeout=60)
        received = recv.request("stop", "result", timeout=30)
        send.wait(30)
        recv.wait(30)
    finally:
        for child in (send, recv):
            if child is not None:
                children.stop(child)

    (r0, s0), (r1, s1) = marks[0], marks[-1]
    elapsed = r1["t"] - r0["t"]
    frames = r1["frames"] - r0["frames"]
    payloadBytes = r1["bytes"] - r0["bytes"]
    perSecond = [
        (b[0]["frames"] - a[0]["frames"]) / (b[0]["t"] - a[0]["t"])
        for a, b in zip(marks, marks[1:])
    ]
    result = {
        "mode": mode,
        "frame_bytes": size,
        "window_seconds": elapsed,
        "frames_per_second": frames / elapsed,
        "megabytes_per_second": payloadBytes / elapsed / 1e6,
        "sender_frames_per_second": (s1["frames"] - s0["frames"]) / elapsed,
        "per_second_frames_min": min(perSecond),
        "per_second_frames_max": max(perSecond),
        "cpu": cpu,
        "total_sent": sent["frames"],
        "total_received": received["frames"],
    }
    if mode == "relay":
        link = sent["links"][0] if sent["links"] else {}
        result["relay_forwarded"] = link.get("frames_out", 0) - link.get("dropped", 0)
        result["relay_received"] = link.get("frames_out", 0)
        result["relay_dropped"] = link.get("dropped", 0)
        result["relay_dropped_percent"] = (
            100.0 * result["relay_dropped"] / result["relay_received"]
            if result["relay_received"] else 0.0
        )
    return result


def throughput(ctx, sizes, warmup, seconds, repeats, retries, foreignLimit):
    """
    Every frame size in both modes, C{repeats} times, interleaved so that
    the baseline and the relay see the same machine; a run during which
    other processes used more than C{foreignLimit}% of a core is run again
    (at most C{retries} times) and reported as disturbed if it stays so.
    """
    runs = []
    discarded = []
    for rep in range(repeats):
        for size in sizes:
            for mode in ("direct", "relay"):
                for attempt in range(retries + 1):
                    run = throughputOnce(ctx, mode, size, warmup, seconds)
                    run["repeat"] = rep
                    run["attempt"] = attempt
                    foreign = run["cpu"]["foreign_cpu_percent"]
                    run["disturbed"] = foreign > foreignLimit
                    ctx.say(
                        f"  {mode:6} {size:5} B: {run['frames_per_second']:10.0f} frames/s "
                        f"{run['megabytes_per_second']:7.1f} MB/s  "
                        f"(cpu: " + ", ".join(
                            f"{k} {v:.0f}%" for k, v in run["cpu"]["cpu_percent"].items()
                        ) + f", others {foreign:.0f}%"
                        + (", dropped %.1f%%" % run["relay_dropped_percent"]
                           if mode == "relay" else "")
                        + (")  DISTURBED, again" if run["disturbed"] and attempt < retries
                           else ")")
                    )
                    if not run["disturbed"] or attempt == retries:
                        break
                    discarded.append(run)
                runs.append(run)

    summary = {}
    for size in sizes:
        entry = {}
        for mode in ("direct", "relay"):
            mine = [r for r in runs if r["frame_bytes"] == size and r["mode"] == mode]
            rates = [r["frames_per_second"] for r in mine]
            entry[mode] = {
                "frames_per_second": median(rates),
                "megabytes_per_second": median([r["megabytes_per_second"] for r in mine]),
                "frames_per_second_min": min(rates),
                "frames_per_second_max": max(rates),
                "runs": len(mine),
                "disturbed_runs": sum(r["disturbed"] for r in mine),
            }
        relayRuns = [r for r in runs if r["frame_bytes"] == size and r["mode"] == "relay"]
        entry["relay"]["dropped_percent"] = median(
            [r["relay_dropped_percent"] for r in relayRuns])
        entry["relay"]["server_cpu_percent"] = median(
            [r["cpu"]["cpu_percent"]["server"] for r in relayRuns])
        entry["ratio_relay_to_direct"] = (
            entry["relay"]["frames_per_second"] / entry["direct"]["frames_per_second"]
        )
        summary[str(size)] = entry
    return {"runs": runs, "summary": summary, "discarded_runs": discarded}


def _stats(values):
    ms = [v * 1000.0 for v in values]
    return {
        "count": len(ms),
        "min_ms": min(ms) if ms else None,
        "median_ms": percentile(ms, 50, "rank"),
        "p90_ms": percentile(ms, 90, "rank"),
        "p99_ms": percentile(ms, 99, "rank"),
        "max_ms": max(ms) if ms else None,
        "mean_ms": statistics.fmean(ms) if ms else None,
        "over_10ms": sum(v > 10.0 for v in ms),
    }


def latency(ctx, sizes, count, warmup, interval):
    children = ctx.children
    tag = ctx.nextId()
    echo = children.worker(f"echo-{tag}", "echo", "--home", ctx.homes["receiver"],
                           "--data", ctx.relayData)
    ping = None
    try:
        ready = echo.expect("ready", 60)
        ping = children.worker(
            f"ping-{tag}", "ping", "--home", ctx.homes["sender"],
            "--peer", ready["session"], "--port", ready["port"],
            "--sizes", ",".join(map(str, sizes)), "--count", count,
            "--warmup", warmup, "--interval", interval,
        )
        ping.expect("ready", 60)
        window = CPUWindow({"server": ctx.relayServer.pid, "pinger": ping.pid,
                            "echo": echo.pid})
        budget = 60 + (count + warmup) * len(sizes) * 2 * (interval + 0.05)
        result = ping.expect("result", budget)
        cpu = window.end()
        ping.wait(30)
        echo.request("stop", "result")
        echo.wait(30)
    finally:
        for child in (ping, echo):
            if child is not None:
                children.stop(child)

    bySize = {}
    for size in sizes:
        # Round trips in the order they were made, None for a lost one.
        relayAll = result["rtts"][f"relay/{size}"]
        directAll = result["rtts"][f"direct/{size}"]
        relay = [r for r in relayAll if r is not None]
        direct = [d for d in directAll if d is not None]
        relayStats, directStats = _stats(relay), _stats(direct)
        paired = [(r - d) / 2 for r, d in zip(relayAll, directAll)
                  if r is not None and d is not None]
        bySize[str(size)] = {
            "relay_rtt": relayStats,
            "direct_rtt": directStats,
            "lost": {"relay": len(relayAll) - len(relay),
                     "direct": len(directAll) - len(direct)},
            # The relay path crosses two more hops than the direct path per
            # round trip (one each way) and passes the server twice.
            "added_one_way_median_ms": (relayStats["median_ms"] - directStats["median_ms"]) / 2,
            "added_one_way_p99_ms": (relayStats["p99_ms"] - directStats["p99_ms"]) / 2,
            "added_one_way_paired": _stats(paired),
        }
    return {"by_size": bySize, "cpu": cpu}
