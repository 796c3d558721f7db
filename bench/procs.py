"""
Processes for the benchmarks: the market server (twistd), registration,
the workers of bench/worker.py, and what /proc says about each.

Every process is started through one L{Children} and is ended by its pid
when the benchmark run ends, however it ends: run.py, flood.py and vms.py
end them from a C{finally} (C{Children.cleanup()} or C{stopAll()}), turn
SIGTERM into an exception so that the C{finally} runs, and each child is
also started with PR_SET_PDEATHSIG so the kernel signals it if the
benchmark dies outright (SIGKILL, or SIGTERM for a program that must end
its own children, such as a seller's QEMUs).
"""

import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
WORKER = os.path.join(HERE, "worker.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

_PR_SET_PDEATHSIG = 1

# glibc malloc settings for the benchmark's client processes (see
# docs/performance.md): a bulk sender frees and reallocates buffers of a few
# hundred KiB on every flush, and with glibc's defaults those come from
# fresh mmaps or a heap top that is trimmed each time, so the sender spends
# most of its time in page faults.  The market server is always run as is.
CLIENT_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(16 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 1024 * 1024),
}


class BenchError(Exception):
    """A benchmark could not run; the message says why."""


def dieWithParent(sig=signal.SIGKILL):
    """A C{preexec_fn}: the kernel sends the child C{sig} when its parent dies."""
    def preexec():
        # Runs in the child between fork and exec.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    return preexec


def _userSystemTicks(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]), int(rest[12])


def cpuTimes(pid):
    """(user, system) CPU seconds of a process, all its threads."""
    user, system = _userSystemTicks(pid)
    return user / CLK_TCK, system / CLK_TCK


def cpuTicks(pid):
    """utime + stime of a process (all its threads), in clock ticks."""
    return sum(_userSystemTicks(pid))


def rssBytes(pid):
    """The resident set of a process, in bytes, from /proc/PID/statm."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def contextSwitches(pid):
    """Voluntary plus involuntary context switches of a process's main thread."""
    total = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                total += int(value)
    return total


def memory(pid):
    """VmRSS, RssAnon and VmHWM of a process, in bytes."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "VmHWM", "Threads"):
                parts = value.split()
                found[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return found


def systemCPU():
    """
    CPU seconds all CPUs spent running processes (user, nice, system) and
    taken by the hypervisor (steal), since boot, from /proc/stat.  Interrupt
    time is left out: loopback traffic is processed there, on behalf of the
    benchmark's own processes.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]
    return {
        "process": (fields[0] + fields[1] + fields[2]) / CLK_TCK,
        "interrupt": (fields[5] + fields[6]) / CLK_TCK,
        "steal": fields[7] / CLK_TCK,
    }


class CPUWindow:
    """
    CPU used over a stretch of time by some processes of ours and by
    everything else on the machine (the "foreign" load that disturbs a
    measurement).
    """

    def __init__(self, processes):
        self.processes = dict(processes)  # name -> pid
        self.t0 = time.monotonic()
        self.system0 = systemCPU()
        self.cpu0 = {name: cpuTimes(pid) for name, pid in self.processes.items()}
        self.switches0 = {
            name: contextSwitches(pid) for name, pid in self.processes.items()
        }

    def end(self):
        elapsed = time.monotonic() - self.t0
        system = systemCPU()
        delta = {key: system[key] - self.system0[key] for key in system}
        times = {
            name: tuple(b - a for a, b in zip(self.cpu0[name], cpuTimes(pid)))
            for name, pid in self.processes.items()
        }
        used = {name: sum(t) for name, t in times.items()}
        switches = {
            name: (contextSwitches(pid) - self.switches0[name]) / elapsed
            for name, pid in self.processes.items()
        }
        foreign = max(0.0, delta["process"] - sum(used.values()))
        return {
            "seconds": elapsed,
            "cpu_percent": {name: 100.0 * s / elapsed for name, s in used.items()},
            "system_cpu_percent": {
                name: 100.0 * t[1] / elapsed for name, t in times.items()
            },
            "context_switches_per_second": switches,
            "foreign_cpu_percent": 100.0 * foreign / elapsed,
            "interrupt_cpu_percent": 100.0 * delta["interrupt"] / elapsed,
            "steal_cpu_percent": 100.0 * delta["steal"] / elapsed,
        }


class Child:
    """A started process: its stdin for commands, its stdout for JSON events."""

    def __init__(self, name, popen, logPath):
        self.name = name
        self.popen = popen
        self.logPath = logPath
        self._pending = b""

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def send(self, word):
        self.popen.stdin.write(word.encode("ascii") + b"\n")
        self.popen.stdin.flush()

    def _readLine(self, deadline):
        fd = self.popen.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no answer in time{self.tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self.popen.wait(timeout=5)
                raise BenchError(
                    f"{self.name} exited (status {self.popen.returncode}){self.tail()}"
                )
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line

    def expect(self, event, timeout):
        """
        The next message whose event is C{event} (a name, or a tuple of
        names); other messages in between are skipped.
        """
        events = (event,) if isinstance(event, str) else tuple(event)
        deadline = time.monotonic() + timeout
        while True:
            line = self._readLine(deadline)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == "error":
                raise BenchError(f"{self.name} failed: {message.get('error')}")
            if message.get("event") in events:
                return message

    def request(self, word, event, timeout=30):
        self.send(word)
        return self.expect(event, timeout)

    def tail(self, lines=15):
        try:
            with open(self.logPath, errors="replace") as f:
                text = f.readlines()[-lines:]
        except OSError:
            return ""
        return ("\n--- last lines of " + self.logPath + ":\n" + "".join(text)) if text else ""

    def wait(self, timeout):
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.name} did not exit in {timeout}s{self.tail()}")


class Children:
    """Every process a benchmark run starts, so that each can be ended."""

    def __init__(self, logDir, clientMalloc=True, cwd=None):
        self.logDir = logDir
        self.cwd = cwd
        self.children = []
        self.workerEnv = None
        if clientMalloc:
            self.workerEnv = dict(os.environ, **CLIENT_MALLOC)

    def spawn(self, name, argv, commands=True, env=None, deathSignal=signal.SIGKILL):
        """
        Start C{argv}, its stderr (and, without C{commands}, its stdout) in
        LOGDIR/NAME.log; with C{commands}, its stdin and stdout are pipes
        for L{Child.send} and L{Child.expect}.
        """
        logPath = os.path.join(self.logDir, f"{name}.log")
        log = open(logPath, "ab")
        try:
            popen = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.PIPE if commands else subprocess.DEVNULL,
                stdout=subprocess.PIPE if commands else log,
                stderr=log,
                preexec_fn=dieWithParent(deathSignal),
                env=env,
                cwd=self.cwd,
                close_fds=True,
            )
        finally:
            log.close()
        child = Child(name, popen, logPath)
        self.children.append(child)
        return child

    def worker(self, name, *args):
        return self.spawn(name, [sys.executable, WORKER, *args], env=self.workerEnv)

    def check(self):
        """Raise L{BenchError} if a child has exited."""
        for child in self.children:
            if not child.alive():
                raise BenchError(f"{child.name} exited with status {child.popen.returncode}; "
                                 f"see {child.logPath}")

    def stop(self, child, timeout=10):
        """End one child: SIGTERM, then SIGKILL if it lingers."""
        if child.popen.poll() is None:
            try:
                child.popen.send_signal(signal.SIGTERM)
                child.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._close(child)
        if child in self.children:
            self.children.remove(child)

    @staticmethod
    def _close(child):
        for stream in (child.popen.stdin, child.popen.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def stopAll(self, timeout=40):
        """
        End every child at once, last started first: SIGTERM to all, then
        SIGKILL to those still there after C{timeout}.  Returns the names
        of those that needed SIGKILL.
        """
        unclean = []
        for child in reversed(self.children):
            if child.alive():
                child.popen.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                unclean.append(child.name)
                child.popen.kill()
                child.popen.wait()
            self._close(child)
        self.children = []
        return unclean

    def cleanup(self):
        for child in list(self.children):
            try:
                self.stop(child, timeout=5)
            except Exception as e:  # keep ending the others
                print(f"bench: could not stop {child.name} ({child.pid}): {e}",
                      file=sys.stderr)


def startServer(children, name, dataDir, listen="tcp:0:interface=127.0.0.1",
                extra=(), timeout=60, **spawnOptions):
    """
    Start C{twistd -n cpushare-server}; returns (child, port) once it
    listens (once it has written DATA/server.address).  C{spawnOptions}
    go to L{Children.spawn}.
    """
    os.makedirs(dataDir, exist_ok=True)
    address = os.path.join(dataDir, "server.address")
    if os.path.exists(address):
        os.remove(address)
    argv = [
        os.path.join(BIN, "twistd"), "-n", "--pidfile=", "cpushare-server",
        "--data", dataDir, "--listen", listen, "--hostname", "localhost", *extra,
    ]
    child = children.spawn(name, argv, commands=False, **spawnOptions)
    deadline = time.monotonic() + timeout
    while not os.path.exists(address):
        if not child.alive():
            raise BenchError(f"the server exited (status {child.popen.returncode})"
                             f"{child.tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"the server did not start listening in {timeout}s{child.tail()}")
        time.sleep(0.1)
    with open(address) as f:
        port = json.load(f)["port"]
    return child, port


def register(home, port, dataDir, name, timeout=60):
    """An account on the market, through the cpushare CLI as a user would make it."""
    argv = [
        os.path.join(BIN, "cpushare"), "--home", home, "register",
        "--server", f"127.0.0.1:{port}", "--ca", os.path.join(dataDir, "ca.pem"),
        "--name", name,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            preexec_fn=dieWithParent())
    if result.returncode != 0:
        raise BenchError(f"registering {name} failed: {result.stderr.strip()}")
    return home
