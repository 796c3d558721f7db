#!/usr/bin/python3
"""
A frame generator that a seller starts in place of QEMU (`--qemu
bench/framevm.py`), for bench/paths.py: it takes QEMU's command line, finds
its MAC and NIC descriptor there, and speaks QEMU's stream netdev framing on
that descriptor (a 4-byte big-endian length, then the frame), as the VM's
virtio-net card would.  Under TCG a real guest's TCP stack tops out near
5 MB/s (docs/performance.md), which would hide the path between sellers
that this measures; nothing else changes: the seller spawns it unprivileged
at idle priority as it spawns QEMU, and its frames go through the seller's
switch, the direct path or the market's relay, as a VM's do.

It says "Linux version" on its console (the VM's first sign of life), then
every 0.2 s broadcasts a hello frame until it heard its peer's (the other
VM of the order).  It reads commands from its console (what the buyer types
with `cpushare console`) and prints one line for each:

    peer TOKEN              PEER TOKEN <peer's MAC>
    lat TOKEN N             LAT TOKEN <median us> <p99 us> <lost>
    tput TOKEN SIZE SECS    TPUT TOKEN <size> <sent> <received> <seconds>

`lat`: N ping-pongs of 64-byte frames with the peer, one at a time.
`tput`: frames of SIZE bytes to the peer as fast as the seller takes them,
for SECS seconds; then it asks the peer how many arrived.  Frames use the
local experimental EtherType 0x88b5.  Standard library only: it runs as the
seller's VM user, with the system's Python.
"""

import os
import select
import socket
import struct
import sys
import time

ETHERTYPE = b"\x88\xb5"
HELLO, SEEN, PING, PONG, DATA, RESET, ASK, COUNT = range(1, 9)
BROADCAST = b"\xff" * 6
LENGTH = struct.Struct("!I")
BODY = struct.Struct("!BQQ")   # kind, number, a second number


def argument(argv, flag, key):
    for i, arg in enumerate(argv[:-1]):
        if arg == flag and key in argv[i + 1]:
            for part in argv[i + 1].split(","):
                if part.startswith(key):
                    return part[len(key):]
    raise SystemExit(f"framevm: no {flag} ...{key} in the command line")


class Nic:
    def __init__(self, fd, mac):
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(True)
        self.mac = mac
        self.peer = None
        self.peerSeen = False
        self.buffer = b""

    def send(self, dst, kind, number=0, other=0, size=64):
        body = BODY.pack(kind, number, other)
        frame = dst + self.mac + ETHERTYPE + body
        frame += bytes(max(0, size - len(frame)))
        self.sock.sendall(LENGTH.pack(len(frame)) + frame)

    def frames(self, timeout):
        """The frames that arrive within C{timeout} seconds (at least one wait)."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return []
        data = self.sock.recv(1 << 20)
        if not data:
            raise SystemExit(0)
        self.buffer += data
        found = []
        while len(self.buffer) >= 4:
            (n,) = LENGTH.unpack(self.buffer[:4])
            if len(self.buffer) < 4 + n:
                break
            frame, self.buffer = self.buffer[4:4 + n], self.buffer[4 + n:]
            if frame[12:14] == ETHERTYPE and len(frame) >= 14 + BODY.size:
                found.append((frame[6:12], BODY.unpack(frame[14:14 + BODY.size])))
        return found


class VM:
    def __init__(self, nic):
        self.nic = nic
        self.received = 0
        self.receivedBytes = 0
        self.pongs = {}

    def handle(self, source, body):
        """A frame of the peer's protocol; answers what needs an answer."""
        kind, number, other = body
        nic = self.nic
        if kind in (HELLO, SEEN) and source != nic.mac:
            nic.peer = source
            nic.peerSeen = nic.peerSeen or kind == SEEN
            if kind == HELLO:
                nic.send(source, SEEN)
        elif kind == PING:
            nic.send(source, PONG, number)
        elif kind == PONG:
            self.pongs[number] = time.monotonic()
        elif kind == DATA:
            self.received += 1
            self.receivedBytes += other
        elif kind == RESET:
            self.received = self.receivedBytes = 0
            nic.send(source, COUNT, number, 0)
        elif kind == ASK:
            nic.send(source, COUNT, self.received, self.receivedBytes)
        return kind, number, other

    def pump(self, timeout):
        return [self.handle(s, b) for s, b in self.nic.frames(timeout)]

    def ask(self, kind, number=0, timeout=10.0):
        """Send C{kind} to the peer until its COUNT comes back: (number, other)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.nic.send(self.nic.peer, kind, number)
            wait = time.monotonic() + 0.5
            while time.monotonic() < wait:
                for k, n, o in self.pump(0.05):
                    if k == COUNT:
                        return n, o
        return None

    def latency(self, count):
        samples, lost = [], 0
        for number in range(count):
            self.pongs.clear()
            sent = time.monotonic()
            self.nic.send(self.nic.peer, PING, number)
            deadline = sent + 1.0
            while number not in self.pongs and time.monotonic() < deadline:
                self.pump(0.05)
            if number in self.pongs:
                samples.append((self.pongs[number] - sent) * 1e6)
            else:
                lost += 1
        samples.sort()
        if not samples:
            return 0, 0, lost
        return (samples[len(samples) // 2], samples[min(len(samples) - 1,
                                                         int(len(samples) * 0.99))], lost)

    def throughput(self, size, seconds):
        if self.ask(RESET) is None:
            return 0, 0, 0.0
        sent, start = 0, time.monotonic()
        body = self.nic.mac + ETHERTYPE
        while time.monotonic() - start < seconds:
            frame = self.nic.peer + body + BODY.pack(DATA, sent, size)
            frame += bytes(max(0, size - len(frame)))
            self.nic.sock.sendall(LENGTH.pack(len(frame)) + frame)
            sent += 1
            if sent % 64 == 0:
                # What the peer or the buyer's switch sent meanwhile.
                self.pump(0)
        elapsed = time.monotonic() - start
        time.sleep(0.5)        # the frames still on their way
        counted = self.ask(ASK)
        return sent, (counted or (0, 0))[0], elapsed


def main(argv):
    mac = bytes.fromhex(argument(argv, "-device", "mac=").replace(":", ""))
    fd = int(argument(argv, "-netdev", "addr.str="))
    nic = Nic(fd, mac)
    vm = VM(nic)
    out = sys.stdout
    out.write("Linux version framevm (a frame generator in place of QEMU)\r\n")
    out.flush()
    console = b""
    lastHello = 0.0
    while True:
        now = time.monotonic()
        if not nic.peerSeen and now - lastHello > 0.2:
            nic.send(BROADCAST, HELLO)
            lastHello = now
        ready, _, _ = select.select([nic.sock, 0], [], [], 0.2)
        if nic.sock in ready:
            vm.pump(0)
        if 0 not in ready:
            continue
        data = os.read(0, 4096)
        if not data:
            return
        console += data.replace(b"\r", b"\n")
        while b"\n" in console:
            line, console = console.split(b"\n", 1)
            words = line.decode("ascii", "replace").split()
            if not words:
                continue
            answer = command(vm, words)
            if answer:
                out.write(answer + "\r\n")
                out.flush()


def command(vm, words):
    nic = vm.nic
    what, token, rest = words[0], words[1] if len(words) > 1 else "-", words[2:]
    if what == "peer":
        return f"PEER {token} {nic.peer.hex(':') if nic.peer else 'none'}"
    if nic.peer is None:
        return f"NOPEER {token}"
    if what == "lat":
        median, p99, lost = vm.latency(int(rest[0]))
        return f"LAT {token} {median:.0f} {p99:.0f} {lost}"
    if what == "tput":
        size, seconds = int(rest[0]), float(rest[1])
        sent, received, elapsed = vm.throughput(size, seconds)
        return f"TPUT {token} {size} {sent} {received} {elapsed:.3f}"
    return None


if __name__ == "__main__":
    main(sys.argv)
