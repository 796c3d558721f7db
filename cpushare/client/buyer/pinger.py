"""
A small blocking tool that joins a buyer's network through the buyer
program's unix socket (QEMU's stream framing), as a local VM would, and
pings VMs: for scripts, the demo and tests on machines where no TAP device
can be had.  It is not reactor code; it blocks the caller.
"""

import os
import socket
import struct
import time

from cpushare.client.buyer import frames

ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV4 = 0x0800
ICMP = 1
DEFAULT_MAC = bytes.fromhex("020000000099")


class PingError(Exception):
    pass


class UnixSocketPinger:
    def __init__(self, path, ip, mac=DEFAULT_MAC):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(0.2)
        self.ip = socket.inet_aton(ip)
        self.mac = mac
        self.buffer = b""
        self.ident = os.getpid() & 0xFFFF

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, frame):
        self.sock.sendall(struct.pack("!I", len(frame)) + frame)

    def frames(self, seconds):
        """Every frame that arrives within C{seconds}."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            self.buffer += data
            while len(self.buffer) >= 4:
                (n,) = struct.unpack("!I", self.buffer[:4])
                if len(self.buffer) < 4 + n:
                    break
                frame, self.buffer = self.buffer[4:4 + n], self.buffer[4 + n:]
                yield frame

    def arp(self, ip, timeout=5.0):
        """The MAC address that answers for C{ip}."""
        target = socket.inet_aton(ip)
        self.send(frames.ethernet(b"\xff" * 6, self.mac, ETHERTYPE_ARP, frames.arp(
            1, self.mac, self.ip, b"\0" * 6, target)))
        for frame in self.frames(timeout):
            try:
                _, src, ethertype, payload = frames.parseEthernet(frame)
                if ethertype == ETHERTYPE_ARP:
                    reply = frames.parseARP(payload)
                    if reply.operation == 2 and reply.senderIP == target:
                        return reply.senderMAC
            except frames.MalformedPacket:
                continue
        raise PingError(f"no ARP reply from {ip} within {timeout:.0f}s")

    def ping(self, ip, mac, seq=1, timeout=5.0):
        """The round trip of one ICMP echo, in seconds, or None if none came back."""
        target = socket.inet_aton(ip)
        echo = struct.pack("!BBHHH", 8, 0, 0, self.ident, seq) + b"cpushare" * 7
        echo = echo[:2] + struct.pack("!H", frames.internetChecksum(echo)) + echo[4:]
        started = time.monotonic()
        self.send(frames.ethernet(mac, self.mac, ETHERTYPE_IPV4,
                                  frames.ipv4(self.ip, target, ICMP, echo)))
        for frame in self.frames(timeout):
            try:
                _, _, ethertype, payload = frames.parseEthernet(frame)
                if ethertype != ETHERTYPE_IPV4:
                    continue
                packet = frames.parseIPv4(payload)
            except frames.MalformedPacket:
                continue
            if packet.protocol == ICMP and packet.src == target and packet.payload[:1] == b"\0" \
                    and struct.unpack("!HH", packet.payload[4:8]) == (self.ident, seq):
                return time.monotonic() - started
        return None
