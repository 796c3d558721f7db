"""
The VM benchmarks of issue 3: a buyer's livecd booted by a seller in
sandboxed QEMU, on the buyer's virtual ethernet through the market.

    .venv/bin/python bench/vms.py [--quick] [--keep]

Four measurements, each against a baseline taken in the same run:

  boot     order placed -> first ping reply through the buyer's TAP device,
           against a bare QEMU of the same ISO (same cores and memory) joined
           to the same buyer network through the buyer's unix socket, from
           its start to the first ping reply (rounds alternate market/bare)
  network  round trips (ping from the TAP) and TCP throughput both ways
           between the TAP address and a market VM (VM -> seller -> server ->
           buyer -> TAP), against the bare VM on the unix socket
           (VM -> buyer -> TAP)
  seller   the seller program's own CPU and memory with 2 idle VMs against
           the same seller with none: the cost per running VM
  desktop  a CPU-bound desktop program (2 processes counting, 2 cores) with a
           2-core market VM running busy loops beside it, against the same
           program with the VM idle (runs alternate)

Everything runs as real processes (twistd cpushare-server, -seller and
-buyer, the cpushare CLI, QEMU under TCG), on loopback and one TAP device,
at most two VMs at once.  It needs root (the TAP device; the seller runs its
VMs as the cpushare-vm user).  Every process it starts is ended by its pid
when the run ends, however it ends.  Results go to bench/results/vms.json;
docs/performance.md explains them.  Nothing here asserts a speed: the exit
status is non-zero only when a measurement could not be taken.

The guest job.  The ISO is the reference livecd built with `cpushare image
build --add DIR`; DIR/start asks a small control server that this benchmark
runs on the TAP address (TCP port 7900) for a shell command, runs it, and
asks again.  Between commands the guest waits in that connection and sends
nothing, so an "idle" VM is idle.  The commands are `dd ... | nc` to send
data to the benchmark, `nc ... >/dev/null` to receive it, and busy loops.
"""

import argparse
import fcntl
import hashlib
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import stats  # noqa: E402
from procs import (  # noqa: E402
    BIN, CLK_TCK, BenchError, Children, cpuTicks, dieWithParent, register, rssBytes, startServer,
)
from stats import ratio, summary  # noqa: E402

CONTROL_PORT = 7900
UPLOAD_PORT = 7901      # the guest sends here (VM -> TAP)
DOWNLOAD_PORT = 7902    # the guest reads from here (TAP -> VM)
VM_CORES, VM_MEMORY = 1, 256
BOOT_TIMEOUT = 180.0
SIOCOUTQ = 0x5411

TARGETS = {
    "boot_ratio_max": 1.3,
    "seller_cpu_percent_per_vm_max": 2.0,
    "seller_rss_bytes_per_vm_max": 30 * 1024 * 1024,
    "desktop_speed_ratio_min": 0.95,
}

START_SCRIPT = r"""#!/bin/sh
# The job of bench/vms.py: ask the benchmark's control server on the gateway
# for a shell command, run it, ask again.  The connection waits (silently)
# until the benchmark has something for this VM.
gw=@GATEWAY@
while :; do
    cmd=$(nc "$gw" @PORT@ </dev/null 2>/dev/null)
    if [ -n "$cmd" ]; then eval "$cmd"; else sleep 1; fi
done
"""

WORKER = r"""
import sys, time
print("ready", flush=True)
sys.stdin.readline()
seconds = float(sys.argv[1])
n = 0
start = time.perf_counter()
cpu = time.process_time()
end = start + seconds
while True:
    for _ in range(20000):
        pass
    n += 1
    if time.perf_counter() >= end:
        break
print(n * 20000, time.perf_counter() - start, time.process_time() - cpu, flush=True)
"""


def log(text):
    print(f"vms: {text}", flush=True)


# -- /proc


def machineTicks():
    """(busy, total) clock ticks of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def otherQemus(mine):
    """Pids of QEMU processes on this machine that this run did not start."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0", 1)[0]
        except OSError:
            continue
        if argv0.endswith(b"qemu-system-x86_64"):
            found.append(int(entry))
    return found


def allProcesses():
    """{(pid, start time): (ppid, comm, ticks)} of every process on the machine."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        found[(int(entry), int(fields[19]))] = (
            int(fields[1]), comm, int(fields[11]) + int(fields[12]))
    return found


def ours(processes):
    """The pids of this benchmark and all its descendants."""
    children = {}
    for (pid, _), (ppid, _, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    mine, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo.extend(children.get(pid, []))
    return mine


class Window:
    """
    CPU used by some processes, and by the whole machine, over a time
    window; and what processes this run did not start used meanwhile
    (C{foreign_cpu_percent}, the top ones named), to show disturbance.
    Processes started during the window count whole; what processes that
    ended during it used, and the kernel's interrupt work, are only in
    C{machine_busy_percent}.
    """

    def __init__(self, pids):
        self.pids = dict(pids)  # name -> pid
        self.t0 = time.monotonic()
        self.machine0 = machineTicks()
        self.all0 = allProcesses()
        self.ticks0 = {name: self._ticks(pid) for name, pid in self.pids.items()}

    @staticmethod
    def _ticks(pid):
        try:
            return cpuTicks(pid)
        except (OSError, ValueError):
            return None

    def end(self):
        seconds = time.monotonic() - self.t0
        busy1, total1 = machineTicks()
        busy0, total0 = self.machine0
        cpu = {}
        for name, pid in self.pids.items():
            now, before = self._ticks(pid), self.ticks0[name]
            cpu[name] = (None if now is None or before is None
                         else round(100.0 * (now - before) / CLK_TCK / seconds, 2))
        ncpu = os.cpu_count() or 1
        all1 = allProcesses()
        mine = ours(all1)
        foreign = []
        oursUsed = 0
        for key, (_, comm, ticks) in all1.items():
            before = self.all0.get(key)
            used = ticks - (before[2] if before is not None else 0)
            if key[0] in mine:
                oursUsed += used
            elif used > 0:
                foreign.append((100.0 * used / CLK_TCK / seconds, key[0], comm))
        foreign.sort(reverse=True)
        return {
            "seconds": round(seconds, 3),
            "cpu_percent": cpu,
            "ours_cpu_percent": round(100.0 * oursUsed / CLK_TCK / seconds, 1),
            "foreign_cpu_percent": round(sum(u for u, _, _ in foreign), 1),
            "foreign_top": [f"{comm} (pid {pid}): {u:.1f}%" for u, pid, comm in foreign[:3]],
            # percent of one core, summed over the machine's cores
            "machine_busy_percent": round(100.0 * ncpu * (busy1 - busy0) / max(1, total1 - total0), 1),
        }


# -- processes


class Logs:
    """
    Follows log files in a thread and notes when each line was first seen,
    so that waiting for "the buyer leased an address" costs no process.
    """

    def __init__(self, interval=0.01):
        self.interval = interval
        self.files = {}  # name -> [path, offset, partial, [(t, line)]]
        self.lock = threading.Condition()
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def follow(self, name, path):
        with self.lock:
            self.files[name] = [path, 0, b"", []]

    def _run(self):
        while not self.done:
            with self.lock:
                self._poll()
            time.sleep(self.interval)

    def _poll(self):
        now = time.monotonic()
        added = False
        for state in self.files.values():
            try:
                with open(state[0], "rb") as f:
                    f.seek(state[1])
                    data = f.read()
            except OSError:
                continue
            if not data:
                continue
            state[1] += len(data)
            data = state[2] + data
            *lines, state[2] = data.split(b"\n")
            state[3].extend((now, line.decode("utf-8", "replace")) for line in lines)
            added = True
        if added:
            self.lock.notify_all()

    def mark(self, name):
        with self.lock:
            self._poll()
            return len(self.files[name][3])

    def wait(self, name, pattern, timeout, since=0, alive=None):
        """(match, time first seen) of the first line of C{name} matching C{pattern}."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = since
        while True:
            with self.lock:
                lines = self.files[name][3]
                for i in range(checked, len(lines)):
                    m = regex.search(lines[i][1])
                    if m:
                        return m, lines[i][0]
                checked = len(lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"timed out waiting for /{pattern}/ in the {name} log")
                self.lock.wait(min(left, 0.5))
            if alive is not None:
                alive()

    def stop(self):
        self.done = True


# -- the guest's partners on the TAP address


class Control:
    """
    Hands each VM (known by its address) the commands queued for it.  A
    guest connects, the connection waits until there is a command, the
    command is sent and the connection closed; the guest runs it and
    connects again.  C{connected(ip)} tells when a guest is waiting.
    """

    def __init__(self, address, port):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(16)
        self.cond = threading.Condition()
        self.queues = {}
        self.waiting = {}
        self.arrivals = {}  # ip -> [monotonic time of each connection]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, (ip, _) = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, ip), daemon=True).start()

    def _serve(self, conn, ip):
        with self.cond:
            self.arrivals.setdefault(ip, []).append(time.monotonic())
            self.waiting[ip] = self.waiting.get(ip, 0) + 1
            self.cond.notify_all()
            while not self.closed and not self.queues.get(ip):
                self.cond.wait()
            self.waiting[ip] -= 1
            command = None if self.closed else self.queues[ip].pop(0)
        try:
            if command is not None:
                conn.sendall(command.encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()

    def send(self, ip, command):
        with self.cond:
            self.queues.setdefault(ip, []).append(command)
            self.cond.notify_all()

    def waitReady(self, ip, timeout, alive=None):
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.waiting.get(ip, 0) < 1 or self.queues.get(ip):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"the guest at {ip} never asked the control server "
                                     f"for work (its start script did not run?)")
                self.cond.wait(min(left, 0.5))
                if alive is not None:
                    self.cond.release()
                    try:
                        alive()
                    finally:
                        self.cond.acquire()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.sock.close()


class DataPorts:
    """
    TCP throughput between the TAP address and a guest.  Upload: the guest
    sends (dd | nc) to UPLOAD_PORT, timed from the first byte to the end of
    the stream.  Download: the guest reads (nc > /dev/null) from
    DOWNLOAD_PORT; we send C{size} bytes and end the stream, timed from the
    accepted connection until the guest's kernel acknowledged every byte
    and the end of the stream (the socket's unacknowledged count, SIOCOUTQ,
    reaches zero).
    """

    def __init__(self, address):
        self.cond = threading.Condition()
        self.results = {}  # (direction, ip) -> [result]
        self.downloadSize = 0
        self.listeners = []
        for port, handler in ((UPLOAD_PORT, self._upload), (DOWNLOAD_PORT, self._download)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, port))
            s.listen(8)
            self.listeners.append(s)
            threading.Thread(target=self._accept, args=(s, handler), daemon=True).start()

    def _accept(self, listener, handler):
        while True:
            try:
                conn, (ip, _) = listener.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn, ip), daemon=True).start()

    def _done(self, direction, ip, result):
        with self.cond:
            self.results.setdefault((direction, ip), []).append(result)
            self.cond.notify_all()

    def _upload(self, conn, ip):
        accepted = time.monotonic()
        first = None
        total = 0
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            while True:
                data = conn.recv(1 << 18)
                if not data:
                    break
                if first is None:
                    first = time.monotonic()
                total += len(data)
        except OSError as e:
            self._done("upload", ip, {"error": str(e)})
            return
        finally:
            conn.close()
        end = time.monotonic()
        seconds = end - (first or accepted)
        self._done("upload", ip, {"bytes": total, "seconds": round(seconds, 4),
                                  "connect_to_first_byte_s": round((first or end) - accepted, 4)})

    def _download(self, conn, ip):
        start = time.monotonic()
        size = self.downloadSize
        chunk = b"\0" * 65536
        try:
            sent = 0
            while sent < size:
                sent += conn.send(chunk[:min(len(chunk), size - sent)])
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 60
            buf = bytearray(4)
            while True:
                fcntl.ioctl(conn.fileno(), SIOCOUTQ, buf)
                if struct.unpack("i", buf)[0] == 0:
                    break
                if time.monotonic() > deadline:
                    raise OSError("the guest never acknowledged the whole stream")
                time.sleep(0.0005)
        except OSError as e:
            self._done("download", ip, {"error": str(e)})
            return
        finally:
            end = time.monotonic()
            conn.close()
        self._done("download", ip, {"bytes": size, "seconds": round(end - start, 4)})

    def wait(self, direction, ip, count, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.results.get((direction, ip), [])) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"the {direction} with {ip} did not finish in {timeout:.0f}s")
                self.cond.wait(left)
            return self.results[(direction, ip)][count - 1]

    def close(self):
        for s in self.listeners:
            s.close()


# -- the market on this machine


class Programs:
    """
    The market's programs a benchmark runs in C{folder}: each twistd program
    (its log followed), the cpushare command line as a user runs it.
    """

    def __init__(self, folder):
        self.folder = folder
        self.children = Children(folder, clientMalloc=False, cwd=folder)
        self.logs = Logs()

    def path(self, *parts):
        return os.path.join(self.folder, *parts)

    def cli(self, home, *args, timeout=120, input=None):
        """C{cpushare --home FOLDER/HOME ARGS}'s output; C{input}: its standard input."""
        result = subprocess.run(
            [os.path.join(BIN, "cpushare"), "--home", self.path(home), *map(str, args)],
            capture_output=True, cwd=self.folder, timeout=timeout, input=input,
            stdin=subprocess.DEVNULL if input is None else None)
        if result.returncode != 0:
            raise BenchError(f"cpushare {' '.join(map(str, args))} failed: "
                             f"{result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode("utf-8", "replace")

    @staticmethod
    def twistdOptions():
        # The market's programs end on SIGTERM, the seller with its QEMUs.
        return {"env": dict(os.environ, PYTHONUNBUFFERED="1"), "deathSignal": signal.SIGTERM}

    def twistd(self, name, *args):
        proc = self.children.spawn(name, [os.path.join(BIN, "twistd"), "-n", "--pidfile=", *args],
                                   commands=False, **self.twistdOptions())
        self.logs.follow(name, self.path(f"{name}.log"))
        return proc

    def alive(self):
        self.children.check()


class Bench(Programs):
    def __init__(self, args):
        Programs.__init__(self, tempfile.mkdtemp(prefix="cpushare-bench-vms-"))
        self.args = args
        self.net = ipaddress.IPv4Network(args.subnet + "/24", strict=False)
        self.gateway = str(self.net.network_address + 1)
        self.tap = args.tap
        self.socket = self.path("buyer", "network.sock")
        self.control = None
        self.data = None
        self.qemus = {}  # pid -> what (every QEMU of this run, market or bare)
        self.bare = {}  # mac -> Child
        self.bareCount = 0
        self.sha256 = None
        self.tapOurs = False  # True once our buyer has made the TAP device

    def setup(self):
        if os.geteuid() != 0:
            raise BenchError("run as root: the buyer needs a TAP device and the seller a VM user")
        if os.path.exists(f"/sys/class/net/{self.tap}"):
            raise BenchError(f"network interface {self.tap} already exists (another run?); "
                             f"choose another with --tap")
        # Nothing else may already use this subnet on this machine.
        for line in subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True,
                                   text=True).stdout.splitlines():
            m = re.search(r"inet (\S+)", line)
            if m and ipaddress.IPv4Interface(m.group(1)).ip in self.net:
                raise BenchError(f"{self.net} is already in use here: {line.strip()}; "
                                 f"choose another with --subnet")
        job = self.path("job")
        os.makedirs(job)
        with open(os.path.join(job, "start"), "w") as f:
            f.write(START_SCRIPT.replace("@GATEWAY@", self.gateway)
                    .replace("@PORT@", str(CONTROL_PORT)))
        os.chmod(os.path.join(job, "start"), 0o755)
        os.makedirs(self.path("buyer"))
        t = time.monotonic()
        self.iso = self.path("job.iso")
        self.cli("buyer", "image", "build", "-o", self.iso, "--add", job, timeout=900)
        log(f"built the livecd with the benchmark's job in {time.monotonic() - t:.1f}s")
        with open(self.iso, "rb") as f:
            self.sha256 = hashlib.file_digest(f, "sha256").hexdigest()

        data = self.path("server-data")
        # No CPU benchmark or canary VM on the seller: it would boot beside the measured ones.
        self.server, port = startServer(self.children, "server", data,
                                        extra=["--cpu-bench-every", "0", "--canary-every", "0"],
                                        **self.twistdOptions())
        self.logs.follow("server", self.path("server.log"))
        where = f"127.0.0.1:{port}"
        for home in ("seller", "buyer"):
            register(self.path(home), port, data, f"bench-{home}", timeout=120)
        subprocess.run([os.path.join(BIN, "cpushare-admin"), "--data", data, "credit",
                        "bench-buyer", "100"],
                       check=True, capture_output=True)
        self.seller = self.twistd(
            "seller", "cpushare-seller", "--home", self.path("seller"), "--cores", 2,
            "--memory", 1024, "--accel", "tcg", "--cache-size", 200)
        self.tapOurs = True  # from here on, a TAP of this name is our buyer's
        self.buyer = self.twistd(
            "buyer", "cpushare-buyer", "--home", self.path("buyer"), "--subnet", str(self.net),
            "--socket", self.socket, "--tap", self.tap)
        self.logs.wait("seller", r"offering \d+ cores", 60, alive=self.alive)
        self.logs.wait("buyer", rf"TAP device {re.escape(self.tap)} is on the buyer's network",
                       60, alive=self.alive)
        self.logs.wait("buyer", r"local VMs and tools join", 60, alive=self.alive)
        # ARP for a VM's new address is retried every 100 ms rather than every
        # second, so the first ping's time does not depend on when the guest
        # happened to configure its address (same for both paths; the
        # setting belongs to this TAP device and goes with it).
        with open(f"/proc/sys/net/ipv4/neigh/{self.tap}/retrans_time_ms", "w") as f:
            f.write("100")
        self.control = Control(self.gateway, CONTROL_PORT)
        self.data = DataPorts(self.gateway)
        deadline = time.monotonic() + 60
        while not json.loads(self.cli("buyer", "sellers", "--json")):
            if time.monotonic() > deadline:
                raise BenchError("the seller never showed up on the market")
            self.alive()
            time.sleep(0.5)
        out = self.cli("buyer", "image", "upload", self.iso)
        if self.sha256 not in out:
            raise BenchError(f"unexpected upload answer: {out!r}")
        self.sellerFreshRSS = rssBytes(self.seller.pid)
        log(f"market up: server {where}, seller pid {self.seller.pid}, buyer pid "
            f"{self.buyer.pid} with TAP {self.tap} ({self.gateway}) and socket")

    # market VMs

    def order(self, vms=1, cores=VM_CORES, memory=VM_MEMORY):
        """Place an order; returns (vm ids, seconds the CLI took)."""
        t = time.monotonic()
        placed = json.loads(self.cli("buyer", "order", "place", "--image", self.sha256,
                                     "--vms", vms, "--cores", cores, "--memory", memory, "--json"))
        return placed["vm_ids"], time.monotonic() - t

    def marketAddress(self, vm, since=0, timeout=BOOT_TIMEOUT):
        """(ip, mac, time the buyer leased it) of market VM C{vm}."""
        m, _ = self.logs.wait("buyer", rf"VM {vm} \(([0-9a-f:]{{17}})\) joined the network",
                              timeout, since, alive=self.alive)
        mac = m.group(1)
        m, t = self.logs.wait("buyer", rf"leased (\S+) to {mac}", timeout, since,
                              alive=self.alive)
        return m.group(1), mac, t

    def qemuOf(self, vm, since=0, timeout=BOOT_TIMEOUT):
        m, t = self.logs.wait("seller", rf"VM {vm} running \(pid (\d+)", timeout, since,
                              alive=self.alive)
        pid = int(m.group(1))
        self.qemus[pid] = f"market VM {vm}"
        return pid, t

    def stopMarket(self, vm, since=0):
        self.cli("buyer", "vm", "stop", vm)
        self.logs.wait("seller", rf"VM {vm} (stopped|failed)", 60, since, alive=self.alive)

    # bare VMs

    def startBare(self, cores=VM_CORES, memory=VM_MEMORY):
        """A bare QEMU of the same ISO on the buyer's unix socket; returns (mac, Child)."""
        self.bareCount += 1
        n = self.bareCount
        mac = f"52:54:00:79:00:{n:02x}"
        argv = [
            shutil.which("qemu-system-x86_64"), "-name", f"bench-bare-{n}",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-accel", "tcg", "-cpu", "max", "-smp", cores, "-m", memory,
            "-drive", f"file={self.iso},if=ide,media=cdrom,readonly=on,format=raw",
            "-boot", "order=d,menu=off",
            "-netdev", f"stream,id=net0,server=off,addr.type=unix,addr.path={self.socket}",
            "-device", f"virtio-net-pci,netdev=net0,mac={mac},romfile=",
            "-chardev", f"file,id=console,path={self.path(f'bare-{n}.console')}",
            "-serial", "chardev:console",
        ]
        if self.args.bare_idle:
            argv = [shutil.which("chrt"), "--idle", "0", shutil.which("nice"), "-n", "19"] + argv
        proc = self.children.spawn(f"bare-{n}", argv, commands=False)
        self.qemus[proc.pid] = f"bare VM {n}"
        self.bare[mac] = proc
        return mac, proc

    def bareAddress(self, mac, proc, since=0, timeout=BOOT_TIMEOUT):
        def alive():
            if not proc.alive():
                raise BenchError(f"bare QEMU ({mac}) exited with status {proc.popen.returncode}")
            self.alive()
        m, t = self.logs.wait("buyer", rf"leased (\S+) to {mac}", timeout, since, alive=alive)
        return m.group(1), t

    def stopBare(self, mac):
        proc = self.bare.pop(mac)
        self.children.stop(proc, timeout=10)

    # cleanup

    def close(self):
        if self.control is not None:
            self.control.close()
        if self.data is not None:
            self.data.close()
        unclean = self.children.stopAll()
        self.logs.stop()
        for pid, what in self.qemus.items():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read()
            except OSError:
                continue
            if b"qemu-system" in argv:
                unclean.append(f"{what} (pid {pid})")
                os.kill(pid, signal.SIGKILL)
        if self.tapOurs and os.path.exists(f"/sys/class/net/{self.tap}"):
            unclean.append(f"TAP {self.tap}")
            subprocess.run(["ip", "link", "delete", self.tap], capture_output=True)
        return unclean


# -- measurements


def firstPing(bench, ip, timeout=60):
    """Ping C{ip} from the TAP every 50 ms until it answers; returns the time it did."""
    result = subprocess.run(
        ["ping", "-n", "-c", "1", "-w", str(timeout), "-i", "0.05", "-I", bench.tap, ip],
        capture_output=True, text=True)
    t = time.monotonic()
    if result.returncode != 0:
        raise BenchError(f"{ip} never answered a ping: {result.stdout.strip()[-300:]}")
    return t


def pingRTT(bench, ip, count, interval=0.05):
    result = subprocess.run(
        ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", "-I", bench.tap, ip],
        capture_output=True, text=True, timeout=count * interval + 30)
    times = [float(t) for t in re.findall(r"time=([0-9.]+) ms", result.stdout)]
    return times, count - len(times)


def cgroupThrottled(pid):
    """How often (and how long) the cgroup CPU cap held back the process's group."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            groups = dict(line.strip().split(":", 2)[1:] for line in f)
        if "cpu,cpuacct" in groups or "cpu" in groups:
            path = "/sys/fs/cgroup/cpu" + groups.get("cpu", groups.get("cpu,cpuacct"))
        else:
            path = "/sys/fs/cgroup" + groups[""]
        with open(os.path.join(path, "cpu.stat")) as f:
            stat = dict(line.split() for line in f)
    except (OSError, KeyError, ValueError):
        return None
    if "throttled_time" in stat:  # v1, nanoseconds
        return {"periods": int(stat["nr_periods"]), "throttled": int(stat["nr_throttled"]),
                "throttled_s": round(int(stat["throttled_time"]) / 1e9, 3)}
    return {"periods": int(stat.get("nr_periods", 0)), "throttled": int(stat.get("nr_throttled", 0)),
            "throttled_s": round(int(stat.get("throttled_usec", 0)) / 1e6, 3)}


def bootRounds(bench, rounds):
    """Order -> first ping (market) against spawn -> first ping (bare), alternating."""
    results = {"market": [], "bare": []}
    # Warm the seller's image cache first: its first order fetches the ISO
    # over its connection; the measured rounds are the steady state.  The
    # fetch is timed and reported on its own.
    mark = bench.logs.mark("seller")
    t0 = time.monotonic()
    [vm], _ = bench.order()
    _, tCached = bench.logs.wait("seller", rf"cached image {bench.sha256}", BOOT_TIMEOUT, mark,
                                 alive=bench.alive)
    _, tRunning = bench.qemuOf(vm, mark)
    bench.stopMarket(vm, mark)
    warm = {"order_to_image_cached_s": round(tCached - t0, 3),
            "order_to_qemu_started_s": round(tRunning - t0, 3),
            "iso_bytes": os.path.getsize(bench.iso)}
    log(f"warm-up order: the seller fetched the {warm['iso_bytes'] / 1e6:.1f} MB ISO in "
        f"{warm['order_to_image_cached_s']:.1f}s after the order")

    for r in range(rounds):
        for kind in ("market", "bare"):
            others = otherQemus(bench.qemus)
            markB, markS = bench.logs.mark("buyer"), bench.logs.mark("seller")
            load = os.getloadavg()[0]
            window = Window({})
            t0 = time.monotonic()
            if kind == "market":
                [vm], cliSeconds = bench.order()
                qemu, tQemu = bench.qemuOf(vm, markS)
                ip, mac, tLease = bench.marketAddress(vm, markB)
            else:
                mac, proc = bench.startBare()
                qemu, tQemu = proc.pid, t0
                ip, tLease = bench.bareAddress(mac, proc, markB)
            tPing = firstPing(bench, ip)
            measured = window.end()
            try:
                qemuCPU = round(cpuTicks(qemu) / CLK_TCK, 2)
            except OSError:
                qemuCPU = None
            entry = {
                "round": r + 1, "ip": ip, "mac": mac,
                "to_first_ping_s": round(tPing - t0, 3),
                "to_qemu_started_s": round(tQemu - t0, 3),
                "to_dhcp_lease_s": round(tLease - t0, 3),
                "lease_to_ping_s": round(tPing - tLease, 3),
                "qemu_cpu_s_at_ping": qemuCPU,
                "loadavg_1min_before": round(load, 2),
                "other_qemu_processes": len(others),
                "machine_busy_percent": measured["machine_busy_percent"],
                "foreign_cpu_percent": measured["foreign_cpu_percent"],
                "foreign_top": measured["foreign_top"],
            }
            if kind == "market":
                entry["vm"] = vm
                entry["order_cli_s"] = round(cliSeconds, 3)
                entry["cgroup_throttled"] = cgroupThrottled(qemu)
                shown = bench.cli("buyer", "console", vm, "--linger", "0.5")
            else:
                # The guest prints its READY line once udhcpc has applied the
                # lease, which may be just after it answered the first ping.
                deadline = time.monotonic() + 10
                while True:
                    with open(bench.path(f"bare-{bench.bareCount}.console"),
                              errors="replace") as f:
                        shown = f.read()
                    if "CPUSHARE-READY" in shown or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
            m = re.search(r"CPUSHARE-READY .*uptime=([0-9.]+)", shown)
            entry["guest_uptime_at_ready_s"] = float(m.group(1)) if m else None
            results[kind].append(entry)
            log(f"boot round {r + 1} {kind}: first ping {entry['to_first_ping_s']:.2f}s after "
                f"{'the order' if kind == 'market' else 'starting QEMU'} "
                f"(QEMU started at {entry['to_qemu_started_s']:.2f}s, "
                f"lease at {entry['to_dhcp_lease_s']:.2f}s; guest uptime at READY "
                f"{entry['guest_uptime_at_ready_s']}s, QEMU CPU {qemuCPU}s, others used "
                f"{entry['foreign_cpu_percent']:.0f}%)")
            if kind == "market":
                bench.stopMarket(vm, markS)
            else:
                bench.stopBare(mac)
    market = [e["to_first_ping_s"] for e in results["market"]]
    bare = [e["to_first_ping_s"] for e in results["bare"]]
    mMed, bMed = statistics.median(market), statistics.median(bare)
    return {
        "what": "market: `cpushare order place` started -> first ping reply through the "
                "buyer's TAP; bare: bare QEMU started (same ISO, -smp 1 -m 256, TCG, on the "
                "buyer's unix socket) -> first ping reply through the same TAP",
        "market_order_to_ping_s": market,
        "bare_start_to_ping_s": bare,
        "market_median_s": round(mMed, 3),
        "bare_median_s": round(bMed, 3),
        "ratio": ratio(mMed, bMed),
        "target_ratio_max": TARGETS["boot_ratio_max"],
        "met": mMed / bMed <= TARGETS["boot_ratio_max"],
        "market_breakdown_median_s": {
            k: round(statistics.median(e[k] for e in results["market"]), 3)
            for k in ("order_cli_s", "to_qemu_started_s", "to_dhcp_lease_s", "lease_to_ping_s")},
        "bare_breakdown_median_s": {
            k: round(statistics.median(e[k] for e in results["bare"]), 3)
            for k in ("to_dhcp_lease_s", "lease_to_ping_s")},
        "guest_uptime_at_ready_median_s": {
            kind: statistics.median([e["guest_uptime_at_ready_s"] for e in results[kind]
                                     if e["guest_uptime_at_ready_s"] is not None] or [0])
            for kind in results},
        "qemu_cpu_s_at_ping_median": {
            kind: statistics.median([e["qemu_cpu_s_at_ping"] for e in results[kind]
                                     if e["qemu_cpu_s_at_ping"] is not None] or [0])
            for kind in results},
        "warm_up": warm,
        "rounds": results,
    }


def sellerIdle(bench, seconds):
    """The seller's own CPU and RSS with no VM, then with 2 idle VMs."""

    def window(label, extra):
        pids = {"seller": bench.seller.pid, "buyer": bench.buyer.pid,
                "server": bench.server.pid, **extra}
        rss = []
        w = Window(pids)
        deadline = time.monotonic() + seconds
        while True:
            rss.append(rssBytes(bench.seller.pid))
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(1.0, left))
        result = w.end()
        result["seller_rss_bytes_mean"] = int(statistics.fmean(rss))
        result["seller_rss_bytes_max"] = max(rss)
        result["seller_rss_samples"] = len(rss)
        result["other_qemu_processes"] = len(otherQemus(bench.qemus))
        log(f"seller with {label}: {result['cpu_percent']['seller']:.2f}% of a core, "
            f"RSS {result['seller_rss_bytes_mean'] / 2**20:.1f} MB "
            f"(machine busy {result['machine_busy_percent']:.0f}%, others "
            f"{result['foreign_cpu_percent']:.0f}%: {', '.join(result['foreign_top'])})")
        return result

    time.sleep(2)
    none = window("no VM", {})
    markB, markS = bench.logs.mark("buyer"), bench.logs.mark("seller")
    vms, _ = bench.order(vms=2)
    qemus, ips = {}, []
    for vm in vms:
        pid, _ = bench.qemuOf(vm, markS)
        qemus[f"qemu_vm_{vm}"] = pid
        ip, _, _ = bench.marketAddress(vm, markB)
        ips.append(ip)
    for ip in ips:
        bench.control.waitReady(ip, 60, alive=bench.alive)
    time.sleep(5)  # let the boot's last chatter (DHCP, reports) pass
    two = window("2 idle VMs", qemus)
    perCPU = (two["cpu_percent"]["seller"] - none["cpu_percent"]["seller"]) / 2
    perRSS = (two["seller_rss_bytes_mean"] - none["seller_rss_bytes_mean"]) / 2
    return {
        "what": "the seller process's own CPU (utime+stime, /proc/PID/stat) and RSS over "
                f"{seconds:.0f}s idle windows: no VM, then 2 idle VMs (1 core, 256 MB each); "
                "QEMU processes are not counted in the seller's figures",
        "no_vm": none,
        "two_idle_vms": two,
        "seller_rss_bytes_before_any_vm": bench.sellerFreshRSS,
        "per_vm_cpu_percent": round(perCPU, 3),
        "per_vm_rss_bytes": int(perRSS),
        "target_cpu_percent_max": TARGETS["seller_cpu_percent_per_vm_max"],
        "target_rss_bytes_max": TARGETS["seller_rss_bytes_per_vm_max"],
        "met": (perCPU < TARGETS["seller_cpu_percent_per_vm_max"]
                and perRSS < TARGETS["seller_rss_bytes_per_vm_max"]),
    }, vms, ips, list(qemus.values())


def network(bench, market, bare, pingRounds, pings, transfers, upSize, downSize, qemus):
    """RTT and throughput: market VM against bare VM, alternating."""
    rtt = {"market": [], "bare": []}
    lost = {"market": 0, "bare": 0}
    for r in range(pingRounds):
        for kind in (("market", "bare") if r % 2 == 0 else ("bare", "market")):
            ip = market if kind == "market" else bare
            times, missing = pingRTT(bench, ip, pings)
            rtt[kind].extend(times)
            lost[kind] += missing
    rttResult = {k: dict(summary(v, 3), lost=lost[k]) for k, v in rtt.items()}
    rttResult["ratio_median"] = ratio(rttResult["market"]["median"], rttResult["bare"]["median"])
    log(f"ping RTT median market {rttResult['market']['median']:.2f} ms "
        f"(p99 {rttResult['market']['p99']:.2f}), bare {rttResult['bare']['median']:.2f} ms "
        f"(p99 {rttResult['bare']['p99']:.2f})")

    bench.data.downloadSize = downSize
    count = upSize // 65536
    commands = {
        "upload": f"dd if=/dev/zero bs=65536 count={count} 2>/dev/null | "
                  f"nc {bench.gateway} {UPLOAD_PORT}",
        "download": f"nc {bench.gateway} {DOWNLOAD_PORT} </dev/null >/dev/null",
    }
    runs = {d: {"market": [], "bare": []} for d in commands}
    done = {}
    for r in range(transfers):
        for direction in ("upload", "download"):
            for kind in (("market", "bare") if r % 2 == 0 else ("bare", "market")):
                ip = market if kind == "market" else bare
                bench.control.waitReady(ip, 60, alive=bench.alive)
                window = Window({"qemu": qemus[kind], "seller": bench.seller.pid,
                                 "server": bench.server.pid, "buyer": bench.buyer.pid,
                                 "benchmark": os.getpid()})
                bench.control.send(ip, commands[direction])
                n = done[(direction, ip)] = done.get((direction, ip), 0) + 1
                result = bench.data.wait(direction, ip, n, 120)
                measured = window.end()
                result["cpu_percent"] = measured["cpu_percent"]
                result["foreign_cpu_percent"] = measured["foreign_cpu_percent"]
                if "error" in result:
                    raise BenchError(f"{direction} with the {kind} VM failed: {result['error']}")
                result["megabytes_per_second"] = round(result["bytes"] / result["seconds"] / 1e6, 3)
                runs[direction][kind].append(result)
    throughput = {}
    names = {"upload": "vm_to_tap", "download": "tap_to_vm"}
    for direction, byKind in runs.items():
        entry = {}
        for kind, results in byKind.items():
            rates = [x["megabytes_per_second"] for x in results]
            cpu = {name: statistics.median(x["cpu_percent"][name] or 0 for x in results)
                   for name in results[0]["cpu_percent"]}
            entry[kind] = dict(summary(rates, 3), cpu_percent_median=cpu, runs=results)
        entry["ratio_median"] = ratio(entry["market"]["median"], entry["bare"]["median"])
        throughput[names[direction]] = entry
        log(f"throughput {names[direction]}: market {entry['market']['median']:.2f} MB/s "
            f"(CPU % {entry['market']['cpu_percent_median']}), bare "
            f"{entry['bare']['median']:.2f} MB/s (CPU % {entry['bare']['cpu_percent_median']})")
    return {
        "what": "ping from the buyer's TAP (56-byte payload, 50 ms apart) and TCP throughput "
                "between the TAP address and a guest (busybox dd | nc, nc > /dev/null), market "
                "VM (through seller, server and buyer) against the bare VM on the buyer's "
                "unix socket; megabytes are 10^6 bytes of TCP payload; cpu_percent is each "
                "process's CPU over the transfer (percent of one core; 'qemu' is the VM's)",
        "rtt_ms": rttResult,
        "throughput": throughput,
        "upload_bytes": upSize,
        "download_bytes": downSize,
    }


def desktopRun(seconds, qemuPid=None):
    """Two counting processes for C{seconds}; returns the total rate and the VM's CPU."""
    workers = []
    try:
        for _ in range(2):
            workers.append(subprocess.Popen(
                [sys.executable, "-c", WORKER, str(seconds)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, preexec_fn=dieWithParent(signal.SIGKILL)))
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise BenchError("a desktop worker did not start")
        pids = {"qemu": qemuPid} if qemuPid else {}
        window = Window(pids)
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        counts = []
        for w in workers:
            line = w.stdout.readline().split()
            w.wait(timeout=seconds + 30)
            counts.append((int(line[0]), float(line[1]), float(line[2])))
        measured = window.end()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    rate = sum(c / s for c, s, _ in counts)
    return {
        "loops_per_second": round(rate),
        "worker_cpu_share": [round(cpu / s, 3) for _, s, cpu in counts],
        "vm_cpu_percent": measured["cpu_percent"].get("qemu"),
        "machine_busy_percent": measured["machine_busy_percent"],
        "foreign_cpu_percent": measured["foreign_cpu_percent"],
        "foreign_top": measured["foreign_top"],
        "other_qemu_processes": None,
    }


PAIR = r"""
import sys, time
start = float(sys.argv[1]); end = start + float(sys.argv[2]); n = 0
time.sleep(max(0.0, start - time.time()))
while time.time() < end:
    n += 1
print(n)
"""


def schedulingDiagnosis(seconds=3.0):
    """
    Why the desktop test comes out as it does: on one CPU, a normal task
    against a SCHED_IDLE nice-19 task (what QEMU is), with the idle task
    (a) in the normal task's cgroup, (b) in a cgroup of its own with the
    default weight (where the seller puts each VM), (c) in a cgroup of its
    own marked cpu.idle=1.  Reports the normal task's share of the work.
    Uses a private cgroup of its own, removed afterwards; cgroup v1 only.
    """
    root = "/sys/fs/cgroup/cpu"
    if not os.path.exists(os.path.join(root, "cpu.shares")):
        return {"skipped": "no cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu"}
    group = os.path.join(root, f"bench-vms-diag-{os.getpid()}")
    cpu = max(os.sched_getaffinity(0))
    result = {}
    os.makedirs(group, exist_ok=True)
    try:
        hasIdle = os.path.exists(os.path.join(group, "cpu.idle"))
        cases = [("same_group", False, None), ("own_group_default_weight", True, "0")]
        if hasIdle:
            cases.append(("own_group_cpu_idle", True, "1"))
        for name, own, idle in cases:
            if idle is not None:
                with open(os.path.join(group, "cpu.idle"), "w") as f:
                    f.write(idle)

            def idlePre(own=own):
                os.sched_setaffinity(0, {cpu})
                if own:
                    with open(os.path.join(group, "cgroup.procs"), "w") as f:
                        f.write(str(os.getpid()))
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                os.nice(19)
                dieWithParent(signal.SIGKILL)()

            def normalPre():
                os.sched_setaffinity(0, {cpu})
                dieWithParent(signal.SIGKILL)()

            argv = [sys.executable, "-c", PAIR, str(time.time() + 1.0), str(seconds)]
            low = subprocess.Popen(argv, stdout=subprocess.PIPE, preexec_fn=idlePre)
            high = subprocess.Popen(argv, stdout=subprocess.PIPE, preexec_fn=normalPre)
            lowN = int(low.communicate(timeout=seconds + 30)[0])
            highN = int(high.communicate(timeout=seconds + 30)[0])
            result[name] = round(highN / (highN + lowN), 3)
    finally:
        try:
            with open(os.path.join(group, "cpu.idle"), "w") as f:
                f.write("0")
        except OSError:
            pass
        for _ in range(50):
            try:
                os.rmdir(group)
                break
            except OSError:
                time.sleep(0.1)
    return {"what": "normal task's share of one CPU against a SCHED_IDLE nice-19 task, by "
                    "where the idle task's cgroup is", "normal_task_share": result}


def groupSettings(pid):
    """cpu.shares and cpu.idle of the VM's cgroup and of each parent up to the root."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            groups = dict(line.strip().split(":", 2)[1:] for line in f)
        path = groups.get("cpu") or groups.get("cpu,cpuacct")
    except (OSError, ValueError):
        return None
    if path is None:
        return None
    found = {}
    while True:
        full = "/sys/fs/cgroup/cpu" + path.rstrip("/")
        entry = {}
        for name in ("cpu.shares", "cpu.idle", "cpu.cfs_quota_us"):
            try:
                with open(os.path.join(full, name)) as f:
                    entry[name] = int(f.read())
            except (OSError, ValueError):
                pass
        found[path or "/"] = entry
        if path in ("/", ""):
            return found
        path = os.path.dirname(path.rstrip("/"))


def desktop(bench, runs, seconds):
    """The desktop program alone (VM idle) against beside a 2-core VM at full tilt."""
    noVM = desktopRun(seconds)
    log(f"desktop program with no VM at all: {noVM['loops_per_second'] / 1e6:.1f} M loops/s")
    markB, markS = bench.logs.mark("buyer"), bench.logs.mark("seller")
    [vm], _ = bench.order(cores=2)
    qemu, _ = bench.qemuOf(vm, markS)
    ip, _, _ = bench.marketAddress(vm, markB)
    bench.control.waitReady(ip, 60, alive=bench.alive)
    busy = ("rm -f /run/bench-busy; for i in 1 2; do (while :; do :; done) & "
            "echo $! >> /run/bench-busy; done")
    calm = "kill $(cat /run/bench-busy) 2>/dev/null; rm -f /run/bench-busy"
    time.sleep(2)

    # The guest's loops really take two cores when nothing else runs.
    bench.control.send(ip, busy)
    bench.control.waitReady(ip, 30, alive=bench.alive)
    time.sleep(1)
    w = Window({"qemu": qemu})
    time.sleep(3)
    vmAlone = w.end()["cpu_percent"]["qemu"]
    bench.control.send(ip, calm)
    bench.control.waitReady(ip, 30, alive=bench.alive)
    log(f"the VM's busy loops alone use {vmAlone:.0f}% of a core")
    time.sleep(1)

    results = {"alone": [], "with_vm": []}
    order = []
    for r in range(runs):
        order += (["alone", "with_vm"] if r % 2 == 0 else ["with_vm", "alone"])
    state = "idle"
    for kind in order:
        want = "busy" if kind == "with_vm" else "idle"
        if want != state:
            bench.control.send(ip, busy if want == "busy" else calm)
            bench.control.waitReady(ip, 30, alive=bench.alive)
            time.sleep(1)
            state = want
        others = len(otherQemus(bench.qemus))
        result = desktopRun(seconds, qemu)
        result["other_qemu_processes"] = others
        results[kind].append(result)
        log(f"desktop program {kind.replace('_', ' ')}: {result['loops_per_second'] / 1e6:.1f} "
            f"M loops/s (VM {result['vm_cpu_percent']:.0f}% of a core, others "
            f"{result['foreign_cpu_percent']:.0f}%)")
    if state == "busy":
        bench.control.send(ip, calm)
    settings = groupSettings(qemu)
    mechanism = schedulingDiagnosis()
    log(f"scheduling check, a normal task's share of a CPU against a SCHED_IDLE one: "
        f"{mechanism.get('normal_task_share', mechanism)}")
    alone = statistics.median(r["loops_per_second"] for r in results["alone"])
    withVM = statistics.median(r["loops_per_second"] for r in results["with_vm"])
    return {
        "what": f"2 processes counting in a Python loop for {seconds:.0f}s (loops per second, "
                "summed), beside a market VM (2 cores, 256 MB) idle ('alone') or running 2 "
                "shell busy loops ('with_vm'), runs alternating; 'no_vm' ran before the VM "
                "was ordered",
        "no_vm": noVM,
        "vm_busy_alone_cpu_percent": vmAlone,
        "alone_median_loops_per_second": round(alone),
        "with_vm_median_loops_per_second": round(withVM),
        "ratio": ratio(withVM, alone),
        "target_ratio_min": TARGETS["desktop_speed_ratio_min"],
        "met": withVM / alone >= TARGETS["desktop_speed_ratio_min"],
        "vm_cpu_percent_while_desktop_ran": statistics.median(
            r["vm_cpu_percent"] for r in results["with_vm"]),
        "runs": results,
        "vm": vm,
        "qemu_pid": qemu,
        "vm_cgroup_settings": settings,
        "scheduling_check": mechanism,
    }, vm


def environment():
    def run(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                                  timeout=10).stdout.strip()
        except OSError:
            return None
    commit, dirty = stats.gitState()
    return {
        "cpu": stats.cpuModel(), "cores": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": (run("qemu-system-x86_64", "--version") or "").splitlines()[0:1],
        "git_commit": commit,
        "git_dirty": dirty,
        "loadavg_at_start": list(os.getloadavg()),
    }


def parser():
    p = argparse.ArgumentParser(
        prog="bench/vms.py", description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one boot round, short windows and runs: a smoke test")
    p.add_argument("--rounds", type=int, default=None, help="boot rounds of each kind (3; quick 1)")
    p.add_argument("--idle", type=float, default=None,
                   help="seconds of each seller idle window (15; quick 5)")
    p.add_argument("--pings", type=int, default=None,
                   help="pings per batch; two batches per path (50; quick 20)")
    p.add_argument("--transfers", type=int, default=None,
                   help="transfers per direction and path (4; quick 1)")
    p.add_argument("--upload-mb", type=float, default=None,
                   help="MiB per VM -> TAP transfer (8; quick 4)")
    p.add_argument("--download-mb", type=float, default=None,
                   help="MiB per TAP -> VM transfer (32; quick 16)")
    p.add_argument("--runs", type=int, default=None,
                   help="desktop runs of each kind (3; quick 1)")
    p.add_argument("--run-seconds", type=float, default=None,
                   help="seconds of each desktop run (5; quick 3)")
    p.add_argument("--tap", default="cpsb0", help="the buyer's TAP device")
    p.add_argument("--subnet", default="10.79.0.0", help="the buyer's /24 subnet")
    p.add_argument("--bare-idle", action="store_true",
                   help="run the bare baseline QEMU at SCHED_IDLE and nice 19 too")
    p.add_argument("--results", default=stats.resultPath("vms"),
                   help="where the JSON goes")
    p.add_argument("--keep", action="store_true", help="keep the working folder (logs)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    q = args.quick
    for name, full, quick in (("rounds", 3, 1), ("idle", 15.0, 5.0), ("pings", 50, 20),
                              ("transfers", 4, 1), ("upload_mb", 8.0, 4.0),
                              ("download_mb", 32.0, 16.0), ("runs", 3, 1),
                              ("run_seconds", 5.0, 3.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    started = time.monotonic()
    env = environment()
    bench = Bench(args)
    results = {"benchmark": "vms", "quick": q, "environment": env}
    failed = None
    try:
        log(f"working in {bench.folder}")
        bench.setup()
        results["boot"] = bootRounds(bench, args.rounds)
        results["seller"], idleVMs, idleIPs, idleQemus = sellerIdle(bench, args.idle)
        # The network comparison: one of those market VMs against a bare VM.
        mark = bench.logs.mark("seller")
        bench.stopMarket(idleVMs[1], mark)
        markB = bench.logs.mark("buyer")
        mac, proc = bench.startBare()
        bareIP, _ = bench.bareAddress(mac, proc, markB)
        bench.control.waitReady(bareIP, 60, alive=bench.alive)
        bench.control.waitReady(idleIPs[0], 60, alive=bench.alive)
        results["network"] = network(
            bench, idleIPs[0], bareIP, 2, args.pings, args.transfers,
            int(args.upload_mb * 2**20), int(args.download_mb * 2**20),
            {"market": idleQemus[0], "bare": proc.pid})
        bench.stopBare(mac)
        bench.stopMarket(idleVMs[0], bench.logs.mark("seller"))
        results["desktop"], vm = desktop(bench, args.runs, args.run_seconds)
        bench.stopMarket(vm, bench.logs.mark("seller"))
    except (BenchError, KeyboardInterrupt, OSError, subprocess.SubprocessError) as e:
        failed = f"{type(e).__name__}: {e}"
        log(f"failed: {failed}")
    finally:
        unclean = bench.close()
        for s, h in previous.items():
            signal.signal(s, h)
    if unclean:
        log("had to kill: " + ", ".join(unclean))
    results["parameters"] = {k: v for k, v in vars(args).items() if k not in ("results",)}
    results["date"] = stats.now()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["unclean_stop"] = unclean
    if failed:
        results["failed"] = failed
        log(f"logs kept in {bench.folder}")
    elif not args.keep:
        shutil.rmtree(bench.folder, ignore_errors=True)
    else:
        log(f"files kept in {bench.folder}")
    if not failed:
        stats.write(args.results, results)
        log(f"results in {args.results} ({results['elapsed_s']:.0f}s)")
        headline(results)
    return 1 if failed else 0


def headline(r):
    b, n, s, d = r["boot"], r["network"], r["seller"], r["desktop"]
    rows = [
        ("boot: order -> first ping", f"{b['market_median_s']:.2f} s",
         f"bare QEMU {b['bare_median_s']:.2f} s", f"{b['ratio']:.2f} (<= 1.3)"),
        ("ping RTT median", f"{n['rtt_ms']['market']['median']:.2f} ms",
         f"{n['rtt_ms']['bare']['median']:.2f} ms", f"{n['rtt_ms']['ratio_median']:.2f}"),
        ("ping RTT p99", f"{n['rtt_ms']['market']['p99']:.2f} ms",
         f"{n['rtt_ms']['bare']['p99']:.2f} ms", ""),
    ]
    for k, label in (("vm_to_tap", "throughput VM -> TAP"), ("tap_to_vm", "throughput TAP -> VM")):
        t = n["throughput"][k]
        rows.append((label, f"{t['market']['median']:.2f} MB/s", f"{t['bare']['median']:.2f} MB/s",
                     f"{t['ratio_median']:.2f}"))
    rows += [
        ("seller CPU per idle VM", f"{s['per_vm_cpu_percent']:.2f} % of a core",
         f"{s['no_vm']['cpu_percent']['seller']:.2f} % with no VM", "(< 2 %)"),
        ("seller RSS per idle VM", f"{s['per_vm_rss_bytes'] / 2**20:.1f} MB",
         f"{s['no_vm']['seller_rss_bytes_mean'] / 2**20:.1f} MB with no VM", "(< 30 MB)"),
        ("desktop speed beside a busy VM", f"{d['with_vm_median_loops_per_second'] / 1e6:.1f} M/s",
         f"{d['alone_median_loops_per_second'] / 1e6:.1f} M/s alone", f"{d['ratio']:.3f} (>= 0.95)"),
    ]
    for row in rows:
        print("  {:<32} {:>18}  {:>28}  {}".format(*row))


if __name__ == "__main__":
    sys.exit(main())
