"""
VMs on two sellers behind NATs talk directly, with real QEMU VMs, in
network namespaces the test builds (test/netns.py):

    "internet" (routes): the market (UDP port open), the buyer, a forger
        |                      |
    router A (NAT)         router B (NAT)
        |                      |
    home A: seller sam     home B: seller sue

Each router masquerades its home: MASQUERADE keeps the source port (a cone
NAT), with a home router's firewall that drops what comes unasked from
outside ("restricted" in test/netns.py); with --random-fully it gives each
destination a new port (a symmetric NAT).  The sellers use ephemeral UDP
ports: they get through by hole punching only.  (Two routers that only
masquerade, with no firewall, punch only when both ends start within the
time a datagram takes between them: test/integration/test_nat_matrix.py
and docs/performance.md, "Direct paths through NATs".)

Needs root (network namespaces, iptables); CI runs as root.
"""

import os
import random
import re
import struct
import threading
import time

import pytest

from test import netns
from test.integration.conftest import START_TIMEOUT, executable, runCLI, waitUntil
from test.integration.test_measured_link import startServerIn
from test.vm.test_market_vms import BOOT_TIMEOUT, buildJobISO, consoleRun

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (ip netns, veth, iptables); CI runs as root")]

# What each VM serves: 2 MiB of random bytes over HTTP, and their md5.
JOB = """#!/bin/sh
dd if=/dev/urandom of=/tmp/big bs=1024 count=2048 2>/dev/null
httpd -p 8080 -h /tmp
echo "job-ready $(md5sum /tmp/big | cut -c1-32)"
"""
BIG = 2048 * 1024
DIRECT_WAIT = 40.0


class Lab(netns.ProcessesInNamespaces):
    """
    The namespaces above (test/netns.py), with home routers of C{kinds}:
    "restricted" (MASQUERADE, which keeps the port: a cone NAT, with a home
    router's firewall) or "symmetric" (MASQUERADE --random-fully).
    """

    def __init__(self, processes, kinds):
        netns.ProcessesInNamespaces.__init__(self, processes,
                                             f"cpushare-dp{os.getpid() % 100000}-")
        self.kinds = kinds

    def up(self):
        self.internet = netns.Internet(self.net)
        self.public, self.marketIP = self.internet.public, self.internet.address
        self.homes = [self.internet.home(f"h{i}", kind) for i, kind in enumerate(self.kinds)]
        self.forger, _ = self.internet.host("forger")

    def inside(self, ns, *argv):
        return netns.run(*self.net.exec(ns, *argv))

    def cli(self, home, *args, ns=None, timeout=120):
        result = runCLI("cpushare", "--home", home, *args, timeout=timeout,
                        prefix=self.net.exec(ns or self.public))
        assert result.status == 0, result
        return result


@pytest.fixture(scope="module")
def jobISO(tmp_path_factory):
    return buildJobISO(tmp_path_factory.mktemp("paths"), JOB, network=True)


def market(internet, processes, tmp_path, jobISO):
    """The market, sam and sue in their homes, bob's buyer and his two VMs: their addresses."""
    data = tmp_path / "market"
    internet.server, address = startServerIn(internet, internet.public, data,
                                             internet.marketIP, ["--udp-port", "0"])
    server = f"{internet.marketIP}:{address['port']}"
    homes = {}
    for name, ns in [("bob", internet.public), ("sam", internet.homes[0].ns),
                     ("sue", internet.homes[1].ns)]:
        homes[name] = tmp_path / name
        internet.cli(homes[name], "register", "--server", server, "--ca", data / "ca.pem",
                     "--name", name, ns=ns)
    internet.sellers = {}
    for name, ns in (("sam", internet.homes[0].ns), ("sue", internet.homes[1].ns)):
        proc = internet.start(ns, name, [
            executable("twistd"), "-n", "--pidfile=", "cpushare-seller", "--home", homes[name],
            "--cores", 1, "--memory", 512, "--accel", "tcg", "--cache-size", 200])
        proc.waitForLog("mesh: candidates given to the market", timeout=START_TIMEOUT)
        internet.sellers[name] = proc
    credited = runCLI("cpushare-admin", "--data", data, "credit", "bob", "100")
    assert credited.status == 0, credited
    bob = homes["bob"]
    internet.start(internet.public, "buyer", [
        executable("twistd"), "-n", "--pidfile=", "cpushare-buyer", "--home", bob,
        "--subnet", "10.77.0.0/24", "--socket", bob / "network.sock", "--tap", "none",
    ]).waitForLog("as buyer ", timeout=START_TIMEOUT)
    internet.cli(bob, "image", "upload", jobISO)
    placed = internet.cli(bob, "order", "place", "--image", jobISO, "--vms", 2, "--cores", 1,
                          "--memory", 256, "--json").json()
    vms = {}

    def addresses():
        listed = internet.cli(bob, "vms", "--json").json()
        for vm in listed:
            assert vm["state"] not in ("failed", "stopped"), vm
        vms.update({vm["seller"]: (vm["vm"], vm["ip"]) for vm in listed if vm.get("ip")})
        return len(vms) == 2
    waitUntil(addresses, "both VMs to get DHCP addresses", BOOT_TIMEOUT, processes, 1.0)
    assert sorted(v for v, _ in vms.values()) == sorted(placed["vm_ids"])
    return bob, vms


def paths(internet, bob):
    return internet.cli(bob, "vms", "--paths", "--json").json()


def onVM(internet, bob, vm, command, expect, linger=6):
    return consoleRun(bob, vm, command, expect, linger=linger,
                      prefix=["ip", "netns", "exec", internet.public])


def forge(internet, target, source, datagrams):
    """
    Send C{datagrams} to C{target} from the forger's namespace with the IP
    source C{source} (spoofed: the forger knows a peer's public address).
    """
    script = f"""
import socket, struct
def checksum(data):
    data += b"\\0" * (len(data) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xffff)
    return ~(total + (total >> 16)) & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
src, dst = {source!r}, {target!r}
for payload in {datagrams!r}:
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    s.sendto(ip + udp, (dst[0], 0))
"""
    internet.inside(internet.forger, "python3", "-c", script)


def droppedSoFar(seller):
    """The seller's last count of dropped datagrams, by reason."""
    lines = re.findall(r"mesh: dropped so far: (.*)", seller.log())
    if not lines:
        return {}
    return {reason: int(n) for reason, n in
            (item.rsplit(": ", 1) for item in lines[-1].split(", "))}


def publicAddress(seller):
    found = re.search(r"mesh: public address ([0-9.]+):(\d+)", seller.log())
    assert found, seller.log()
    return found.group(1), int(found.group(2))


@pytest.fixture
def cones(processes):
    yield from netns.running(Lab(processes, ("restricted", "restricted")))


@pytest.fixture
def symmetric(processes):
    yield from netns.running(Lab(processes, ("symmetric", "symmetric")))


def test_vms_behind_two_cone_nats_talk_directly_and_fall_back_to_the_relay_when_cut(
        cones, processes, tmp_path, jobISO):
    internet = cones
    bob, vms = market(internet, processes, tmp_path, jobISO)
    (samVM, _), (sueVM, sueIP) = vms["sam"], vms["sue"]

    def direct():
        [pair] = paths(internet, bob)
        return pair if pair["state"] == "direct" else None
    pair = waitUntil(direct, "the pair of sellers to go direct", DIRECT_WAIT, processes, 1.0)
    assert {pair["seller_a"], pair["seller_b"]} == {"sam", "sue"}
    assert pair["rtt_ms"] > 0

    # A ping and a bulk transfer between the VMs, over the direct path; no
    # frame comes twice (a loop, or a frame sent both ways, would).
    pinged = onVM(internet, bob, samVM, f"ping -c 3 -W 5 {sueIP}",
                  r"3 packets transmitted, 3 packets received")
    assert "DUP" not in pinged and "duplicates" not in pinged, pinged
    ready = onVM(internet, bob, sueVM, "echo", r"job-ready [0-9a-f]{32}")
    md5 = re.search(r"job-ready ([0-9a-f]{32})", ready).group(1)
    onVM(internet, bob, samVM, f"wget -q -O - http://{sueIP}:8080/big | md5sum",
         rf"{md5}\s+-", linger=20)
    # Both ends counted the transfer, and the buyer is billed the smaller count.
    carried = waitUntil(lambda: (lambda p: p["direct_bytes"] >= BIG and p)(
        paths(internet, bob)[0]), "the direct bytes to be reported", 30, processes, 1.0)
    assert carried["state"] == "direct"
    for seller in internet.sellers.values():
        assert "Traceback" not in seller.log()

    # A forger on the internet who knows sue's public address spoofs it
    # towards sam's: random bytes and made-up sessions reach no VM.
    samPublic, suePublic = (publicAddress(internet.sellers[n]) for n in ("sam", "sue"))
    before = droppedSoFar(internet.sellers["sam"])
    rng = random.Random(14)
    junk = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 40))) for _ in range(20)]
    madeUp = [struct.pack("!BBxxIQ", 1, 1, rng.getrandbits(32) or 1, n) + bytes(100)
              for n in range(20)]
    forge(internet, samPublic, suePublic, junk + madeUp)

    def counted():
        now = droppedSoFar(internet.sellers["sam"])
        grew = sum(now.values()) - sum(before.values())
        return grew >= 40 and now
    now = waitUntil(counted, "sam's seller to count the forged datagrams", 30, processes, 1.0)
    assert now.get("unknown session", 0) - before.get("unknown session", 0) >= 20, now
    onVM(internet, bob, samVM, f"ping -c 2 -W 5 {sueIP}",
         r"2 packets transmitted, 2 packets received")

    # The path is cut mid-transfer: the frames go through the relay within 5 s.
    pinging = time.monotonic()
    output = []
    pinger = threading.Thread(target=lambda: output.append(onVM(
        internet, bob, samVM, f"ping -c 60 -i 0.25 -W 1 {sueIP}",
        r"60 packets transmitted", linger=25)))
    pinger.start()
    time.sleep(3)
    cut = time.monotonic()
    internet.inside(internet.homes[0].router, "iptables", "-I", "FORWARD", "-p", "udp",
                    "-j", "DROP")
    relayed = waitUntil(lambda: (lambda p: p["state"] != "direct" and p)(
        paths(internet, bob)[0]), "the pair to leave the direct path", 20, processes, 0.2)
    seen = time.monotonic() - cut
    pinger.join(120)
    assert output, "the ping never finished"
    received = int(re.search(r"60 packets transmitted, (\d+) packets received",
                             output[0]).group(1))
    # At most 5 s of pings (20 of them, at 4 a second) lost while the path dies.
    print(f"cut mid-transfer: {60 - received} of 60 pings lost, {(60 - received) / 4:.2f} s;"
          f" the market showed it after {seen:.1f} s")
    assert received >= 60 - 22, output[0]
    assert relayed["state"] in ("relayed", "trying"), relayed
    # The market's view lags the sellers' by their check (0.5 s) and the CLI's round trip.
    assert seen < 5.0 + 3.0, seen
    assert pinging < cut
    onVM(internet, bob, samVM, f"ping -c 3 -W 5 {sueIP}",
         r"3 packets transmitted, 3 packets received")


def test_vms_behind_two_symmetric_nats_use_the_relay(symmetric, processes, tmp_path, jobISO):
    internet = symmetric
    bob, vms = market(internet, processes, tmp_path, jobISO)
    (samVM, _), (_, sueIP) = vms["sam"], vms["sue"]
    # Hole punching gives up after 10 s of probes: relayed, with the reason.
    pair = waitUntil(lambda: (lambda p: p["state"] == "relayed" and p)(
        paths(internet, bob)[0]), "the pair to be relayed", DIRECT_WAIT, processes, 1.0)
    assert "hole punching failed" in pair["why"]
    assert pair["direct_bytes"] == 0
    onVM(internet, bob, samVM, f"ping -c 3 -W 5 {sueIP}",
         r"3 packets transmitted, 3 packets received")
    assert paths(internet, bob)[0]["state"] != "direct"
