"""
Helpers for the integration tests: the real twistd plugins and the real
`cpushare` CLI run as processes on 127.0.0.1, with real certificates in
pytest's tmp_path.

In the style of tahoe-lafs's integration tests: each process is started by
a helper that waits for a readiness condition (a file appearing, a log line)
and, on timeout, fails with everything the process wrote.  Every process
started by a test is ended at that test's teardown, even when the test
failed; on failure the logs of all of them are printed.

Executables are found next to sys.executable, so the suite runs with the
virtualenv's python: `.venv/bin/python -m pytest test/integration`.
"""

import ctypes
import json
import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
HERE = Path(__file__).parent
DRIVER = HERE / "clientdriver.py"
LOOPBACK = "127.0.0.1"

# Readiness timeouts are generous (a loaded CI machine); tests that pass do
# not wait for them.
START_TIMEOUT = 30.0

# twistd ends by re-raising the SIGTERM it was stopped with (Twisted >= 24.7),
# so a clean stop shows as -SIGTERM; older versions exit with 0.
CLEAN_EXIT = (0, -signal.SIGTERM)
CLI_TIMEOUT = 60.0

# The server's heartbeat settings for the suite: short, so that a silent
# peer is declared gone within seconds.
HEARTBEAT = 0.5
SILENCE_TIMEOUT = 3.0


def executable(name):
    path = BIN / name
    if not path.exists():
        pytest.fail(
            f"{path} does not exist: run the suite with the virtualenv's python "
            f"(make setup; .venv/bin/python -m pytest test/integration)"
        )
    return str(path)


def _environment():
    env = dict(os.environ)
    env.pop("CPUSHARE_HOME", None)
    # Log lines reach the log file as they are written: readiness waits on them.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _dieWithParent():
    # Linux: the child is killed if the test runner itself dies, so no
    # market is left running behind a crashed or killed pytest.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:
        pass


class ProcessFailed(AssertionError):
    pass


class Process:
    """A child process whose stdout and stderr go to one log file."""

    def __init__(self, name, argv, logPath, cwd):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.logPath = Path(logPath)
        self._log = open(self.logPath, "wb")
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, cwd=str(cwd), env=_environment(),
            preexec_fn=_dieWithParent if sys.platform.startswith("linux") else None,
        )
        self.pid = self.popen.pid
        self.stopped = False

    def __repr__(self):
        return f"<Process {self.name} pid {self.pid}>"

    def log(self):
        try:
            return self.logPath.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self):
        return self.popen.poll() is None

    def describe(self):
        state = "running" if self.alive() else f"exited with status {self.popen.returncode}"
        return (
            f"--- {self.name} (pid {self.pid}, {state}): {' '.join(self.argv)}\n"
            f"{self.log()}--- end of {self.name}\n"
        )

    def fail(self, message, others=()):
        text = [message, self.describe()] + [p.describe() for p in others if p is not self]
        raise ProcessFailed("\n".join(text))

    def waitFor(self, condition, what, timeout=START_TIMEOUT, others=()):
        """
        Poll C{condition()} until it is true and return its value; fail with
        the collected output if the process exits or C{timeout} passes.
        """
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            value = condition()
            if value:
                return value
            if not self.alive():
                value = condition()
                if value:
                    return value
                self.fail(f"{self.name} exited while waiting for {what}", others)
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:.0f}s waiting for {what}", others)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def waitForLog(self, text, timeout=START_TIMEOUT, after=0, count=1, others=()):
        """Wait until C{text} appears C{count} times in the log (after offset C{after})."""
        return self.waitFor(
            lambda: self.log()[after:].count(text) >= count,
            f"{text!r} in the log of {self.name}", timeout, others,
        )

    def signal(self, signum):
        if self.alive():
            os.kill(self.pid, signum)

    def stop(self, timeout=10.0):
        """SIGTERM, then SIGKILL if it lingers; returns the exit status."""
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self.stopped = True
        self._log.close()
        return self.popen.returncode


class Processes:
    """Every process a test started, so teardown can end them all."""

    def __init__(self, root):
        self.root = Path(root)
        self.all = []
        self._counts = {}

    def start(self, name, argv, cwd=None):
        n = self._counts.get(name, 0) + 1
        self._counts[name] = n
        logName = f"{name}.log" if n == 1 else f"{name}-{n}.log"
        proc = Process(name if n == 1 else f"{name}#{n}", argv,
                       self.root / "logs" / logName, cwd or self.root)
        self.all.append(proc)
        return proc

    def describe(self):
        return "\n".join(p.describe() for p in self.all)

    def stopAll(self):
        for proc in reversed(self.all):
            try:
                proc.stop(timeout=5.0)
            except Exception as e:  # keep ending the others
                print(f"could not stop {proc}: {e}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def processes(tmp_path, request):
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path)
    yield procs
    failed = any(
        getattr(request.node, f"report_{when}", None) is not None
        and getattr(request.node, f"report_{when}").failed
        for when in ("setup", "call")
    )
    procs.stopAll()
    if failed:
        print("\n===== logs of the processes this test started =====")
        print(procs.describe())


# -- the CLI


class CLIResult:
    def __init__(self, argv, completed):
        self.argv = argv
        self.status = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr

    def __repr__(self):
        return (
            f"<cpushare {' '.join(self.argv)}: status {self.status}\n"
            f"stdout: {self.stdout!r}\nstderr: {self.stderr!r}>"
        )

    def json(self):
        assert self.status == 0, self
        return json.loads(self.stdout)


def runCLI(program, *args, timeout=CLI_TIMEOUT, input=None, prefix=()):
    """
    Run a command line program; C{input}: its standard input (none when
    None); C{prefix}: what runs it (["ip", "netns", "exec", NS], say).
    """
    argv = [*map(str, prefix), executable(program)] + [str(a) for a in args]
    stdin = subprocess.DEVNULL if input is None else None
    try:
        completed = subprocess.run(
            argv, stdin=stdin, input=input, capture_output=True, text=True,
            timeout=timeout, env=_environment(),
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"{' '.join(argv)} did not finish in {timeout}s; "
            f"stdout {e.stdout!r} stderr {e.stderr!r}"
        )
    return CLIResult(argv[len(prefix) + 1:], completed)


def cpushare(home, *args, **kw):
    return runCLI("cpushare", "--home", home, *args, **kw)


def assertOneLineError(result, *fragments):
    """Exit status 1 and exactly one line on stderr that names the problem."""
    assert result.status == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result
    line = lines[0]
    assert line.startswith("cpushare: "), result
    assert "Traceback" not in result.stderr, result
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def waitUntil(condition, what, timeout=START_TIMEOUT, processes=None, interval=0.1):
    """Poll C{condition()} until it returns something true; fail with the logs."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            logs = processes.describe() if processes is not None else ""
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; "
                f"last value {last!r}\n{logs}"
            )
        time.sleep(interval)


# -- a browser's trust


def browserHome(home, ca, certutil="certutil"):
    """
    A HOME for a browser (Chromium) whose NSS database trusts the CA at
    C{ca} as a buyer who added it would (None: trusts no market's CA).
    """
    nss = Path(home) / ".pki" / "nssdb"
    nss.mkdir(parents=True)
    argvs = [[certutil, "-N", "-d", f"sql:{nss}", "--empty-password"]]
    if ca is not None:
        argvs.append([certutil, "-A", "-d", f"sql:{nss}", "-n", "CPUShare market CA",
                      "-t", "C,,", "-i", str(ca)])
    for argv in argvs:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return Path(home)


# -- the market server


class Market:
    """A cpushare-server process, its data folder and, if given, its --db URL."""

    def __init__(self, processes, data, db=None, extra=()):
        self.processes = processes
        self.data = Path(data)
        self.db = db
        self.extra = [str(a) for a in extra]
        self.port = 0
        self.proc = None
        self.runs = []

    @property
    def ca(self):
        return self.data / "ca.pem"

    @property
    def address(self):
        return f"{LOOPBACK}:{self.port}"

    def _addressFile(self):
        return self.data / "server.address"

    def start(self, port=None):
        """Start the server (on C{port}, or the port of its last run) and wait until it listens."""
        if port is None:
            port = self.port
        addressFile = self._addressFile()
        if addressFile.exists():
            addressFile.unlink()
        self.proc = self.processes.start("server", [
            executable("twistd"), "-n", "--pidfile=", "cpushare-server",
            "--data", self.data, "--listen", f"tcp:{port}:interface={LOOPBACK}",
            "--hostname", "localhost",
            "--heartbeat", HEARTBEAT, "--timeout", SILENCE_TIMEOUT,
            # No CPU benchmark or canary VMs unless a test asks (extra comes last and wins).
            "--cpu-bench-every", "0", "--canary-every", "0",
            # Every account of the suite registers from 127.0.0.1.
            "--registrations-per-address", "0", *self.extra,
        ] + (["--db", self.db] if self.db else []))
        self.runs.append(self.proc)

        def listening():
            try:
                return json.loads(addressFile.read_text())
            except (FileNotFoundError, ValueError):
                return None

        address = self.proc.waitFor(listening, f"{addressFile} (the server listening)")
        assert address["host"] == LOOPBACK, address
        self.port = address["port"]
        if port:
            assert self.port == port, (self.port, port)
        return self

    def stop(self):
        status = self.proc.stop()
        if status not in CLEAN_EXIT:
            self.proc.fail(f"the server exited with status {status}")
        assert not self._addressFile().exists(), "server.address outlived the server"

    def log(self):
        """Everything every run of this server logged."""
        return "".join(run.log() for run in self.runs)

    def waitForLog(self, text, timeout=START_TIMEOUT, count=1):
        return waitUntil(
            lambda: self.log().count(text) >= count,
            f"{text!r} in the server log", timeout, self.processes,
        )

    def register(self, home, name, funds="100"):
        """Register an account; it is given C{funds} (the market's credit) to buy with."""
        result = cpushare(home, "register", "--server", self.address, "--ca", self.ca,
                          "--name", name)
        assert result.status == 0, result
        assert result.stderr == "", result
        if funds:
            credited = self.admin("credit", name, funds)
            assert credited.status == 0, credited
        return Path(home)

    def admin(self, *args):
        where = ["--db", self.db] if self.db else ["--data", self.data]
        return runCLI("cpushare-admin", *where, *args)


@pytest.fixture
def market(processes, tmp_path):
    return Market(processes, tmp_path / "market").start()


def sellers(home, processes=None):
    result = cpushare(home, "sellers", "--json")
    assert result.status == 0, f"{result}\n{processes.describe() if processes else ''}"
    return result.json()


def waitForSellers(home, predicate, what, processes, timeout=START_TIMEOUT):
    """Poll `cpushare sellers --json` until C{predicate(list)}; returns the list."""
    found = []

    def check():
        found[:] = sellers(home, processes)
        return predicate(found)

    waitUntil(check, what, timeout, processes, interval=0.2)
    return list(found)


# -- the seller and buyer programs


class Client:
    """A cpushare-seller or cpushare-buyer process."""

    def __init__(self, proc, home, role):
        self.proc = proc
        self.home = Path(home)
        self.role = role

    def waitConnected(self, count=1, timeout=START_TIMEOUT):
        self.proc.waitForLog(f"as {self.role} ", timeout=timeout, count=count)


def startSeller(processes, home, cores=2, memory=1024, name="seller", extra=()):
    # These tests run no VMs: skip the KVM probe (test_vm covers it).
    proc = processes.start(name, [
        executable("twistd"), "-n", "--pidfile=", "cpushare-seller",
        "--home", home, "--cores", cores, "--memory", memory, "--accel", "tcg",
        *extra,
    ])
    return Client(proc, home, "seller")


def startBuyer(processes, home, name="buyer"):
    # These tests need no TAP device: several buyers may run at once.
    proc = processes.start(name, [
        executable("twistd"), "-n", "--pidfile=", "cpushare-buyer", "--home", home,
        "--tap", "none",
    ])
    return Client(proc, home, "buyer")


# -- a raw TLS client, speaking the wire format by hand (docs/protocol.md)

HEADER = struct.Struct("!II")


def ampBox(**fields):
    """One AMP box as bytes: the keys and values as given (str or bytes)."""
    out = []
    for key, value in fields.items():
        if isinstance(value, str):
            value = value.encode()
        elif isinstance(value, int):
            value = str(value).encode()
        key = key.encode()
        out.append(struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value)
    return b"".join(out) + b"\x00\x00"


def parseBoxes(data):
    """(complete AMP boxes as dicts of bytes, the unparsed rest)."""
    boxes = []
    while True:
        box, offset = {}, 0
        while True:
            if len(data) - offset < 2:
                return boxes, data
            (n,) = struct.unpack_from("!H", data, offset)
            if n == 0:
                offset += 2
                break
            key = data[offset + 2:offset + 2 + n]
            offset += 2 + n
            if len(data) - offset < 2:
                return boxes, data
            (m,) = struct.unpack_from("!H", data, offset)
            if len(data) - offset - 2 < m or len(key) < n:
                return boxes, data
            box[key.decode()] = data[offset + 2:offset + 2 + m]
            offset += 2 + m
        boxes.append(box)
        data = data[offset:]


class RawClient:
    """
    A blocking Python ssl client: TLS 1.3 to the market, optionally with a
    home's client certificate, and the mux spoken by hand.
    """

    def __init__(self, market, home=None, certificate=True, timeout=10.0):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cafile=str(market.ca))
        if home is not None and certificate:
            ctx.load_cert_chain(str(Path(home) / "cert.pem"), str(Path(home) / "key.pem"))
        raw = socket.create_connection((LOOPBACK, market.port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.localPort = self.sock.getsockname()[1]
        self.buffer = b""
        self.control = b""
        self.boxes = []
        self.serverGreeting = None
        self._ask = 0

    @property
    def peerName(self):
        """How the server names this connection in its log."""
        return f"{LOOPBACK}:{self.localPort}"

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data)

    def _recv(self):
        """Bytes from the server; b"" once it closed the connection."""
        try:
            return self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError,
                BrokenPipeError):
            return b""
        except ssl.SSLError as e:
            if "closed" in str(e) or "EOF" in str(e) or "reset" in str(e).lower():
                return b""
            raise

    def readGreeting(self):
        while b"\n" not in self.buffer:
            data = self._recv()
            if not data:
                raise AssertionError(f"closed before a greeting; got {self.buffer!r}")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        self.serverGreeting = line
        return line

    def greet(self, line=b"CPUSHARE/1 rawtest/1\n"):
        self.send(line)

    def sendMessage(self, channel, payload):
        self.send(HEADER.pack(channel, len(payload)) + payload)

    def call(self, command, **arguments):
        """Send an AMP command on channel 0; returns its _ask tag."""
        self._ask += 1
        tag = str(self._ask)
        self.sendMessage(0, ampBox(_command=command, _ask=tag, **arguments))
        return tag

    def answer(self, tag, timeout=10.0):
        """The box answering C{tag} (a result or an error)."""
        deadline = time.monotonic() + timeout
        while True:
            for box in self.boxes:
                if box.get("_answer", box.get("_error")) == tag.encode():
                    self.boxes.remove(box)
                    return box
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer to {tag} in {timeout}s; boxes {self.boxes}")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self._recv()
            except (socket.timeout, TimeoutError):
                continue
            if not data:
                raise AssertionError(f"connection closed before the answer to {tag}")
            self._take(data)

    def _take(self, data):
        self.buffer += data
        while len(self.buffer) >= HEADER.size:
            channel, length = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + length:
                break
            payload = self.buffer[HEADER.size:HEADER.size + length]
            self.buffer = self.buffer[HEADER.size + length:]
            if channel == 0:
                self.control += payload
                boxes, self.control = parseBoxes(self.control)
                self.boxes.extend(boxes)
        # Answer heartbeats, as a live client would.
        for box in list(self.boxes):
            if box.get("_command") == b"Ping":
                self.boxes.remove(box)
                self.sendMessage(0, ampBox(_answer=box["_ask"], nonce=box["nonce"]))

    def waitClosed(self, timeout=10.0):
        """Read until the server closes the connection; returns what arrived."""
        deadline = time.monotonic() + timeout
        got = b""
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self._recv()
            except (socket.timeout, TimeoutError):
                continue
            if not data:
                return got
            got += data
        raise AssertionError(f"the server did not close the connection in {timeout}s")


# -- a Twisted client driven line by line (clientdriver.py)


class Driver:
    """
    clientdriver.py as a process: JSON requests on its stdin, one JSON
    answer a line on its stdout.  Holds any number of client sessions.
    """

    def __init__(self, processes, name="driver"):
        self.processes = processes
        argv = [sys.executable, str(DRIVER)]
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(processes.root / "logs" / f"{name}.log", "wb"),
            cwd=str(processes.root), env=_environment(),
            preexec_fn=_dieWithParent if sys.platform.startswith("linux") else None,
        )
        # Registered like the others, so that teardown ends it.
        proc = Process.__new__(Process)
        proc.name, proc.argv, proc.popen, proc.pid = name, argv, self.popen, self.popen.pid
        proc.logPath = processes.root / "logs" / f"{name}.log"
        proc._log = open(os.devnull, "wb")
        proc.stopped = False
        processes.all.append(proc)
        self.proc = proc
        self._buffer = b""

    def __call__(self, op, **arguments):
        request = dict(arguments, op=op)
        timeout = 30.0 + arguments.get("timeout", 10.0)
        self.popen.stdin.write(json.dumps(request).encode() + b"\n")
        self.popen.stdin.flush()
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.proc.fail(f"the driver did not answer {request} in {timeout}s",
                               self.processes.all)
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 1 << 20)
                if not data:
                    self.popen.wait(5)
                    self.proc.fail(f"the driver exited while answering {request}",
                                   self.processes.all)
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)
