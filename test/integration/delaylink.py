"""
A network link with a delay and a rate, in user space, for kernels without
tc's netem (the test machines' kernel has no sch_netem): two TAP devices,
and every frame read from one is written to the other after the delay, at
most at the rate, like `tc qdisc add dev ... root netem delay D rate R`.

    python delaylink.py TAP_A TAP_B DELAY_A_TO_B RATE_A_TO_B DELAY_B_TO_A RATE_B_TO_A

Delays are in seconds, rates in bits a second (0: unlimited).  It creates
both devices in its own network namespace, prints "ready", and forwards
until it is killed; the test moves the devices into the namespaces it
joins (the open devices keep working) and gives them addresses.  At most
QUEUE frames wait in each direction; more are dropped, as netem's limit.
"""

import fcntl
import heapq
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
QUEUE = 10_000


def openTap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Direction:
    def __init__(self, source, sink, delay, rate):
        self.source, self.sink = source, sink
        self.delay, self.rate = delay, rate
        self.busyUntil = 0.0
        self.waiting = 0


def main(a, b, delayAB, rateAB, delayBA, rateBA):
    fdA, fdB = openTap(a), openTap(b)
    directions = {
        fdA: Direction(fdA, fdB, float(delayAB), float(rateAB)),
        fdB: Direction(fdB, fdA, float(delayBA), float(rateBA)),
    }
    print("ready", flush=True)
    due = []            # (when, sequence, direction, frame)
    sequence = 0
    while True:
        now = time.monotonic()
        wait = max(0.0, due[0][0] - now) if due else 1.0
        readable, _, _ = select.select(list(directions), [], [], wait)
        now = time.monotonic()
        for fd in readable:
            way = directions[fd]
            while True:
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if way.waiting >= QUEUE:
                    continue
                start = max(now, way.busyUntil)
                way.busyUntil = start + (len(frame) * 8 / way.rate if way.rate else 0.0)
                sequence += 1
                heapq.heappush(due, (way.busyUntil + way.delay, sequence, way, frame))
                way.waiting += 1
        while due and due[0][0] <= now:
            _, _, way, frame = heapq.heappop(due)
            way.waiting -= 1
            try:
                os.write(way.sink, frame)
            except OSError:
                pass        # the device is down or being moved: the frame is lost


if __name__ == "__main__":
    main(*sys.argv[1:])
