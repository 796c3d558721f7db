"""
The whole path with real VMs: a buyer orders VMs running its livecd,
sellers boot them in sandboxed QEMU, and the VMs join the buyer's virtual
ethernet through the market server.  Real twistd processes, real TLS, real
QEMU under TCG (at most two VMs at once), a real TAP device (these tests
run as root, as CI does).
"""

import os
import pwd
import re
import signal
import subprocess

import pytest

from cpushare.client.buyer.pinger import PingError, UnixSocketPinger
from cpushare.vm import isoimage, livecd
from test.integration.conftest import (
    CLEAN_EXIT, START_TIMEOUT, Market, cpushare, executable, waitUntil,
)

BOOT_TIMEOUT = 180.0
VM_USER = "cpushare-vm"


def run(home, *args, timeout=60):
    result = cpushare(home, *args, timeout=timeout)
    assert result.status == 0, result
    return result


def buildJobISO(folder, job, network=False):
    """The reference livecd with C{job} as its start script (and no network), in C{folder}."""
    files = folder / "files"
    files.mkdir(parents=True)
    if not network:
        (files / "no-network").write_text("")
    start = files / "start"
    start.write_text(job)
    start.chmod(0o755)
    iso = folder / "job.iso"
    result = subprocess.run(
        [executable("cpushare"), "image", "build", "-o", iso, "--add", files, "--no-ssh-key"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result
    return iso


@pytest.fixture(scope="module")
def sshKey(tmp_path_factory):
    """A fresh ssh key of the buyer's, with no passphrase."""
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "buyer@test", "-f", key],
                   check=True, timeout=60)
    return key


@pytest.fixture(scope="module")
def jobISO(tmp_path_factory, sshKey):
    folder = tmp_path_factory.mktemp("job")
    (folder / "files").mkdir()
    start = folder / "files" / "start"
    start.write_text("#!/bin/sh\necho hello from the job on $(hostname)\n")
    start.chmod(0o755)
    iso = folder / "job.iso"
    result = subprocess.run(
        [executable("cpushare"), "image", "build", "-o", iso, "--add", folder / "files",
         "--ssh-key", f"{sshKey}.pub"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result
    assert "1 ssh key for root" in result.stdout, result
    return iso


class Network:
    """Where a buyer's network is: its TAP device name, subnet and socket."""

    def __init__(self, tap, subnet, socketPath):
        self.tap, self.subnet, self.socket = tap, subnet, socketPath

    @property
    def gateway(self):
        return self.subnet.rsplit(".", 1)[0] + ".1"


SELLER_GRACE = 12


def startSeller(processes, home, cores, memory, name="seller", extra=(), twistd=None):
    """A seller; C{twistd} is the command that runs twistd (test/cheatingseller.py's, say)."""
    proc = processes.start(name, [
        *(twistd or [executable("twistd")]), "-n", "--pidfile=", "cpushare-seller", "--home", home,
        "--cores", cores, "--memory", memory, "--accel", "tcg", "--cache-size", 200,
        "--grace", SELLER_GRACE, *extra,
    ])
    proc.waitForLog("offering", timeout=START_TIMEOUT)
    return proc


def startBuyer(processes, home, tap, subnet, name="buyer"):
    socketPath = home / "network.sock"
    argv = [executable("twistd"), "-n", "--pidfile=", "cpushare-buyer", "--home", home,
            "--subnet", f"{subnet}/24", "--socket", socketPath, "--tap", tap or "none"]
    proc = processes.start(name, argv)
    proc.waitForLog("as buyer ", timeout=START_TIMEOUT)
    if tap:
        proc.waitForLog(f"TAP device {tap} is on the buyer's network", timeout=START_TIMEOUT)
    return proc, Network(tap, subnet, socketPath)


def vms(home):
    return {vm["vm"]: vm for vm in run(home, "vms", "--json").json()}


def waitForAddress(home, vm, processes):
    def leased():
        found = vms(home).get(vm)
        assert found is not None and found["state"] not in ("failed", "stopped"), found
        return found["ip"] if found.get("ip") else None
    return waitUntil(leased, f"VM {vm} to get a DHCP address", BOOT_TIMEOUT, processes, 0.5)


def order(home, iso, count=1, cores=1, memory=256):
    placed = run(home, "order", "place", "--image", iso, "--vms", count, "--cores", cores,
                 "--memory", memory, "--json").json()
    return placed["vm_ids"]


def ping(address, count=3, interface=None):
    argv = ["ping", "-c", str(count), "-i", "0.2", "-W", "2", address]
    if interface:
        argv[1:1] = ["-I", interface]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def ssh(address, command, knownHosts, key=None):
    """Run C{command} in a VM with OpenSSH's client, as root, with C{key} or none."""
    argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={knownHosts}", "-o", "ConnectTimeout=60"]
    if key is None:
        argv += ["-o", "PubkeyAuthentication=no"]
    else:
        argv += ["-o", "IdentitiesOnly=yes", "-i", str(key)]
    return subprocess.run(argv + [f"root@{address}", command], capture_output=True, text=True,
                          timeout=120)


def console(home, vm, typed, linger=3.0, prefix=()):
    """
    Type into a VM's console and return what it showed (history included);
    C{prefix} runs the command line (["ip", "netns", "exec", NS], say).
    """
    result = subprocess.run(
        [*map(str, prefix), executable("cpushare"), "--home", home, "console", str(vm),
         "--linger", str(linger)], input=typed, capture_output=True, timeout=60)
    assert result.returncode == 0, result
    return result.stdout.decode("utf-8", "replace")


def consoleRun(home, vm, command, expect, linger=3.0, tries=4, prefix=()):
    """
    Run C{command} on a VM's console until its output matches C{expect}.
    The guest's shell drops what is typed while it redraws its prompt (it
    asks the terminal where the cursor is, and nobody answers a pipe), so a
    command that left no trace is typed again.
    """
    shown = ""
    for _ in range(tries):
        shown = console(home, vm, command.encode() + b"\n", linger, prefix)
        if re.search(expect, shown):
            return shown
    raise AssertionError(f"{command!r} never showed {expect!r}:\n{shown}")


def qemuOf(vm, root):
    """
    The pid of the QEMU running VM C{vm} for a seller of this test (its
    home under C{root}): other tests' sellers, in the other test process or
    elsewhere on the machine, may run a VM of the same number at the same
    time.
    """
    out = subprocess.run(["pgrep", "-f", f"cpushare-vm-{vm} -nodefaults"], capture_output=True,
                         text=True).stdout.split()
    ours = []
    for pid in out:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = f.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{parent}/cmdline", "rb") as f:
                if f"--home\0{root}/".encode() in f.read():
                    ours.append(int(pid))
        except (OSError, IndexError):
            pass                        # gone already
    assert len(ours) == 1, (out, ours)
    return ours[0]


# -- the tests


def test_an_ordered_vm_boots_sandboxed_and_joins_the_buyers_network(
        market, processes, tmp_path, jobISO, sshKey):
    seller = market.register(tmp_path / "sam", "sam")
    buyer = market.register(tmp_path / "bob", "bob")
    sellerProc = startSeller(processes, seller, cores=2, memory=1024)
    buyerProc, net = startBuyer(processes, buyer, "cpst-a", "10.77.0.0")

    uploaded = run(buyer, "image", "upload", jobISO).stdout
    assert "sha256" in uploaded
    again = run(buyer, "image", "upload", jobISO).stdout
    assert "already on the market" in again
    [vm] = order(buyer, jobISO, cores=1, memory=256)
    ip = waitForAddress(buyer, vm, processes)
    assert ip.startswith("10.77.0.")
    listed = vms(buyer)[vm]
    assert (listed["state"], listed["seller"]) == ("running", "sam")
    assert re.fullmatch(r"0a:cb:(..:){3}..", listed["mac"])

    # Reached from the buyer's TAP device...
    result = ping(ip, interface=net.tap)
    assert result.returncode == 0, result
    # ...and by a local tool on the unprivileged unix socket.
    with UnixSocketPinger(net.socket, "10.77.0.50") as tool:
        mac = tool.arp(ip)
        assert mac.hex(":") == listed["mac"]
        assert tool.ping(ip, mac) is not None

    # The buyer logs in by ssh with the key the image was built with, and
    # in no other way.
    knownHosts = tmp_path / "known_hosts"
    result = ssh(ip, "uname -r; grep -c processor /proc/cpuinfo", knownHosts, sshKey)
    assert result.returncode == 0, result
    iso = isoimage.openISO(str(jobISO))
    kernel = livecd.readMarker(iso)["kernel_version"]
    iso.close()
    assert result.stdout.split() == [kernel, "1"], result
    assert knownHosts.read_text().startswith(f"{ip} ssh-ed25519 "), "a host key made at boot"
    refused = ssh(ip, "true", knownHosts)
    assert refused.returncode == 255, refused
    assert f"root@{ip}: Permission denied (publickey)." in refused.stderr, refused

    # The console shows the readiness line and the job's output, and takes commands.
    shown = consoleRun(buyer, vm, "echo typed-$((6*7))", r"typed-42")
    assert re.search(rf"CPUSHARE-READY mac={listed['mac']} ip={re.escape(ip)}/24", shown), shown
    assert "hello from the job" in shown, shown

    # The sandbox, read from the live QEMU process.
    pid = qemuOf(vm, tmp_path)
    status = open(f"/proc/{pid}/status").read()
    uid = int(re.search(r"Uid:\s+(\d+)", status).group(1))
    assert uid == pwd.getpwnam(VM_USER).pw_uid != 0
    assert re.search(r"Seccomp:\s+2", status)
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    assert os.getpriority(os.PRIO_PROCESS, pid) == 19
    argv = open(f"/proc/{pid}/cmdline").read().split("\0")
    for flag in ("-nodefaults", "-no-user-config", "-nographic"):
        assert flag in argv
    assert argv[argv.index("-sandbox") + 1] == (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
    assert argv[argv.index("-smp") + 1] == "1" and argv[argv.index("-m") + 1] == "256"
    assert [a for a in argv if a.startswith("stream,")] == [
        "stream,id=net0,server=off,addr.type=fd,addr.str=3"]
    assert argv.count("-netdev") == 1 and argv.count("-device") == 3
    assert [argv[i + 1].split(",")[0] for i, a in enumerate(argv) if a == "-device"] == [
        "virtio-net-pci", "virtio-serial-pci", "virtserialport"], "one NIC and the result port"
    # Its only files: the ISO, read-only; its NIC and QMP are socketpairs.
    files = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("/"):
            flags = int(open(f"/proc/{pid}/fdinfo/{fd}").read().split("flags:")[1].split()[0], 8)
            files[target] = flags & os.O_ACCMODE
    assert [os.path.basename(f) for f in files if not f.startswith("/dev/")] == [
        run(buyer, "image", "list", "--json").json()[0]["sha256"] + ".iso"]
    assert set(v for f, v in files.items() if f.endswith(".iso")) == {os.O_RDONLY}
    cgroups = open(f"/proc/{pid}/cgroup").read()
    assert f"cpushare-vms/vm-{vm}" in cgroups
    sellerLog = sellerProc.log()
    assert "VM limits: cgroup v" in sellerLog
    if os.path.exists("/sys/fs/cgroup/cpu/cpushare-vms"):
        quota = open(f"/sys/fs/cgroup/cpu/cpushare-vms/vm-{vm}/cpu.cfs_quota_us").read()
        assert int(quota) == 100000
        # The VMs' group yields the CPU to the desktop, not only QEMU inside it.
        if os.path.exists("/sys/fs/cgroup/cpu/cpushare-vms/cpu.idle"):
            assert open("/sys/fs/cgroup/cpu/cpushare-vms/cpu.idle").read().strip() == "1"
            assert "VMs' group idle by cpu.idle" in sellerLog
    assert listed["cpu_seconds"] >= 0
    waitUntil(lambda: vms(buyer)[vm]["cpu_seconds"] > 0, "CPU seconds reported",
              30, processes, 0.5)

    # A server restart does not stop the VM: the seller reattaches it.
    market.proc.stop()
    market.start()
    waitUntil(lambda: "reattached VMs [" in sellerProc.log(), "the seller to reattach",
              START_TIMEOUT, processes, 0.5)
    assert qemuOf(vm, tmp_path) == pid
    waitUntil(lambda: ping(ip, count=1, interface=net.tap).returncode == 0,
              "the VM to answer pings again", START_TIMEOUT, processes, 0.5)
    assert vms(buyer)[vm]["state"] == "running"

    # Stopping the VM stops QEMU.
    run(buyer, "vm", "stop", vm)
    waitUntil(lambda: vms(buyer)[vm]["state"] == "stopped", "the VM to stop", 30, processes)
    assert vms(buyer)[vm]["reason"] == "stopped by the buyer"
    waitUntil(lambda: not os.path.exists(f"/proc/{pid}"), "QEMU to exit", 30, processes)

    # A market gone for longer than the seller's grace period: its VMs stop.
    [second] = order(buyer, jobISO)
    waitForAddress(buyer, second, processes)
    pid = qemuOf(second, tmp_path)
    market.proc.stop()
    waitUntil(lambda: not os.path.exists(f"/proc/{pid}"),
              "the seller to stop its VM after its grace period", SELLER_GRACE + 30, processes)
    assert "the market did not come back in 12s; stopping all VMs" in sellerProc.log()


def test_vms_on_two_sellers_reach_each_other(market, processes, tmp_path, jobISO):
    buyer = market.register(tmp_path / "bob", "bob")
    for name in ("sam", "sue"):
        startSeller(processes, market.register(tmp_path / name, name), 1, 512, name)
    startBuyer(processes, buyer, None, "10.77.0.0")
    run(buyer, "image", "upload", jobISO)
    first, second = order(buyer, jobISO, count=2, cores=1, memory=256)
    listed = vms(buyer)
    assert {listed[first]["seller"], listed[second]["seller"]} == {"sam", "sue"}
    ipFirst = waitForAddress(buyer, first, processes)
    ipSecond = waitForAddress(buyer, second, processes)
    consoleRun(buyer, first, f"ping -c 3 -W 5 {ipSecond}",
               r"3 packets transmitted, 3 packets received", linger=8)
    consoleRun(buyer, second, f"ping -c 2 -W 5 {ipFirst}",
               r"2 packets transmitted, 2 packets received", linger=6)


def test_two_buyers_on_one_seller_never_see_each_others_frames(
        market, processes, tmp_path, jobISO):
    seller = market.register(tmp_path / "sam", "sam")
    alice = market.register(tmp_path / "alice", "alice")
    bob = market.register(tmp_path / "bob", "bob")
    sellerProc = startSeller(processes, seller, cores=2, memory=1024)
    _, aliceNet = startBuyer(processes, alice, None, "10.77.0.0", "buyer-alice")
    _, bobNet = startBuyer(processes, bob, None, "10.78.0.0", "buyer-bob")
    for home in (alice, bob):
        run(home, "image", "upload", jobISO)
    [aliceVM] = order(alice, jobISO)
    [bobVM] = order(bob, jobISO)
    aliceIP = waitForAddress(alice, aliceVM, processes)
    bobIP = waitForAddress(bob, bobVM, processes)
    assert aliceIP.startswith("10.77.0.") and bobIP.startswith("10.78.0.")
    aliceMAC = bytes.fromhex(vms(alice)[aliceVM]["mac"].replace(":", ""))
    bobMAC = bytes.fromhex(vms(bob)[bobVM]["mac"].replace(":", ""))

    # Bob's network watches while Alice's VM broadcasts, floods and spoofs.
    with UnixSocketPinger(bobNet.socket, "10.78.0.50") as watcher:
        consoleRun(alice, aliceVM, (
            "ping -b -c 5 -i 0.2 10.77.0.255; "
            "ping -c 3 -W 1 10.78.0.100; "
            "ip link set eth0 address 0a:cb:00:00:99:99; ping -c 3 -W 1 -b 10.77.0.255; "
            "echo flood-$((1+1))"), r"flood-2", linger=12)
        seen = list(watcher.frames(2))
    sources = {frame[6:12] for frame in seen}
    assert aliceMAC not in sources
    assert bytes.fromhex("0acb00009999") not in sources
    assert sources <= {bobMAC, bytes.fromhex("026370736802")}, sources
    # Bob's VM is unharmed and still answers on Bob's network.
    with UnixSocketPinger(bobNet.socket, "10.78.0.51") as tool:
        assert tool.ping(bobIP, tool.arp(bobIP)) is not None
    assert "Traceback" not in sellerProc.log()


def test_a_crashed_vm_and_a_corrupt_image_show_their_reasons(
        market, processes, tmp_path, jobISO):
    seller = market.register(tmp_path / "sam", "sam")
    buyer = market.register(tmp_path / "bob", "bob")
    sellerProc = startSeller(processes, seller, cores=2, memory=1024)
    startBuyer(processes, buyer, None, "10.77.0.0")
    run(buyer, "image", "upload", jobISO)
    [vm] = order(buyer, jobISO)
    waitUntil(lambda: vms(buyer)[vm]["state"] == "running", "the VM to run",
              BOOT_TIMEOUT, processes, 0.5)
    os.kill(qemuOf(vm, tmp_path), signal.SIGKILL)
    waitUntil(lambda: vms(buyer)[vm]["state"] == "failed", "the crash to be reported",
              30, processes, 0.5)
    assert vms(buyer)[vm]["reason"] == "killed by signal 9"

    # An image corrupted on the server is refused by the seller.
    sha = run(buyer, "image", "list", "--json").json()[0]["sha256"]
    cached = seller / "images" / f"{sha}.iso"
    cached.unlink()
    stored = market.data / "images" / f"{sha}.iso"
    original = stored.read_bytes()
    data = bytearray(original)
    data[40000] ^= 0xFF
    stored.write_bytes(bytes(data))
    [broken] = order(buyer, jobISO)
    waitUntil(lambda: vms(buyer)[broken]["state"] == "failed", "the bad image to fail",
              60, processes, 0.5)
    assert "sha256" in vms(buyer)[broken]["reason"], vms(buyer)[broken]
    assert not cached.exists()
    stored.write_bytes(original)

    # An ISO the BIOS cannot boot (the CLI would refuse to upload it; a
    # client that skips the check still gets a clear reason).
    blank = tmp_path / "blank.iso"
    blank.write_bytes(b"\0" * 65536)
    subprocess.run([executable("python"), "-c", RAW_UPLOAD, str(buyer), str(blank)],
                   check=True, timeout=60)
    [unbootable] = order(buyer, blank)
    waitUntil(lambda: vms(buyer)[unbootable]["state"] == "failed",
              "the unbootable ISO to fail", 60, processes, 0.5)
    assert vms(buyer)[unbootable]["reason"].startswith(
        "the ISO does not boot: Boot failed"), vms(buyer)[unbootable]
    assert "Traceback" not in sellerProc.log()

    # The seller keeps serving; stopped, it leaves no VM behind.
    assert run(buyer, "sellers", "--json").json()[0]["name"] == "sam"
    [last] = order(buyer, jobISO)
    waitUntil(lambda: vms(buyer)[last]["state"] == "running", "a last VM to run",
              BOOT_TIMEOUT, processes, 0.5)
    pid = qemuOf(last, tmp_path)
    assert sellerProc.stop(timeout=30) in CLEAN_EXIT
    assert not os.path.exists(f"/proc/{pid}"), "QEMU outlived its seller"
    listed = vms(buyer)[last]
    assert (listed["state"], listed["reason"]) == ("stopped", "the seller is shutting down")


MARKET_GRACE = 4


def test_a_vm_whose_seller_vanishes_mid_boot_is_placed_again_on_another(
        processes, tmp_path, jobISO):
    market = Market(processes, tmp_path / "market", extra=["--grace", MARKET_GRACE]).start()
    buyer = market.register(tmp_path / "bob", "bob")
    sam = startSeller(processes, market.register(tmp_path / "sam", "sam"), 1, 512, "sam",
                      ["--price", "0.01"])
    sue = startSeller(processes, market.register(tmp_path / "sue", "sue"), 1, 512, "sue",
                      ["--price", "0.02"])
    _, net = startBuyer(processes, buyer, None, "10.77.0.0")
    run(buyer, "image", "upload", jobISO)
    [vm] = order(buyer, jobISO)
    # The cheapest seller first: sam.
    waitUntil(lambda: vms(buyer)[vm]["state"] == "running", "the VM to boot on sam",
              BOOT_TIMEOUT, processes, 0.2)
    assert vms(buyer)[vm]["seller"] == "sam"
    pid = qemuOf(vm, tmp_path)

    # sam vanishes while its VM boots; its QEMU dies with it.
    sam.signal(signal.SIGKILL)
    waitUntil(lambda: not os.path.exists(f"/proc/{pid}"), "QEMU to die with its seller",
              30, processes, 0.1)
    detached = waitUntil(lambda: (lambda v: v if v["state"] == "detached" else None)(vms(buyer)[vm]),
                         "the VM to be detached", 30, processes, 0.2)
    assert detached["reason"] == (
        f"the seller disconnected; waiting up to {MARKET_GRACE}s for it to come back")

    # Past the market's grace period it boots again, from scratch, on sue.
    moved = waitUntil(lambda: (lambda v: v if v.get("seller") == "sue" else None)(vms(buyer)[vm]),
                      "the VM to be placed on sue", MARKET_GRACE + 30, processes, 0.2)
    assert moved["state"] in ("allocated", "fetching", "booting", "running"), moved
    market.waitForLog(f"VM {vm}: its seller did not come back in {MARKET_GRACE}s; placing it again")
    waitUntil(lambda: vms(buyer)[vm]["state"] == "running", "the VM to boot on sue",
              BOOT_TIMEOUT, processes, 0.5)
    assert qemuOf(vm, tmp_path) != pid
    ip = waitForAddress(buyer, vm, processes)
    mac = bytes.fromhex(vms(buyer)[vm]["mac"].replace(":", ""))
    # The guest on sue took its DHCP lease: it answers at that address.
    with UnixSocketPinger(net.socket, "10.77.0.50") as tool:
        def arp():
            try:
                return tool.arp(ip, timeout=1.0)
            except PingError:
                return None
        assert waitUntil(arp, f"{ip} to answer ARP", BOOT_TIMEOUT, processes, 0.5) == mac
        assert tool.ping(ip, mac) is not None
    listed = vms(buyer)[vm]
    assert (listed["state"], listed["seller"]) == ("running", "sue")
    assert "Traceback" not in sue.log() + market.log()


RAW_UPLOAD = """
import sys
from twisted.internet import defer, task
from cpushare.client.cli import upload
from cpushare.client.cli.connection import Connection
from cpushare.client.home import Home

async def main(reactor):
    async with Connection(reactor, Home(sys.argv[1])) as market:
        await upload.upload(reactor, market.session, sys.argv[2])

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


def test_the_market_scores_a_sellers_cpu_with_a_benchmark_vm(processes, tmp_path):
    market = Market(processes, tmp_path / "market",
                    extra=["--cpu-bench-every", "3600", "--cpu-bench-mb", "4"]).start()
    market.waitForLog("CPU benchmark image", timeout=BOOT_TIMEOUT)
    seller = market.register(tmp_path / "sam", "sam", funds=None)
    buyer = market.register(tmp_path / "bob", "bob")
    proc = startSeller(processes, seller, 1, 512)
    market.waitForLog("CPU benchmark of sam:", timeout=BOOT_TIMEOUT)
    score = float(re.search(r"CPU benchmark of sam: ([0-9.]+) MB/s", market.log()).group(1))
    assert score > 0
    # The benchmark VM, a real one on the seller, was stopped once it answered.
    waitUntil(lambda: re.search(r"VM \d+ stopped", proc.log()), "the benchmark VM stopped",
              processes=processes)
    [listed] = run(buyer, "sellers", "--json", "--min-cpu", str(score / 2)).json()
    assert abs(listed["cpu_score"] - score) < 0.051      # the log rounds it
    excluded = run(buyer, "sellers", "--min-cpu", str(score * 2), "--explain").stdout
    assert "less than --min-cpu" in excluded
    # Nobody paid for it.
    books = market.admin("books")
    assert books.status == 0 and "transactions: 1," in books.stdout, books
