"""
A PostgreSQL server for the tests, with a fresh database for each test.

When CPUSHARE_TEST_POSTGRES holds a URL (CI sets it: .ci/run starts the
machine's PostgreSQL), the tests use that server; its role must be allowed
to create databases.  Otherwise the test session starts a private,
throwaway cluster of its own: initdb and postgres from the `postgresql`
Debian package, run as an unprivileged user when the tests run as root,
in a temporary folder, listening on a unix socket only, without fsync.
"""

import glob
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psycopg

from cpushare.server.db.database import masked, oneLine

ENVIRONMENT = "CPUSHARE_TEST_POSTGRES"
START_TIMEOUT = 30.0


class Missing(Exception):
    """PostgreSQL cannot be had; the message says what to do."""


def withDatabase(url, name):
    """C{url} (a postgresql:// URL) naming database C{name} instead."""
    return re.sub(r"^(postgres(?:ql)?://[^/?#]*)(/[^?#]*)?", lambda m: f"{m.group(1)}/{name}", url)


class Server:
    """A PostgreSQL server on which the tests create and drop databases."""

    def __init__(self, adminURL, stop=None):
        self.adminURL = adminURL
        self._stop = stop
        self._names = itertools.count(1)
        try:
            self.admin = psycopg.connect(adminURL, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise Missing(f"cannot connect to the PostgreSQL server {masked(adminURL)}: "
                          f"{oneLine(e)}") from e

    def createDatabase(self):
        """A new, empty database; returns its URL."""
        name = f"cpushare_test_{os.getpid()}_{next(self._names)}"
        self.admin.execute(f"CREATE DATABASE {name}")
        return withDatabase(self.adminURL, name)

    def dropDatabase(self, url):
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        assert name.startswith("cpushare_test_"), name
        # A session still on it (a test's connection the server has not seen
        # close yet) is ended; one the test role may not end is waited for.
        for attempt in range(20):
            try:
                self.admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                return
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ObjectInUse):
                if attempt == 19:
                    raise
                time.sleep(0.25)

    def close(self):
        self.admin.close()
        if self._stop is not None:
            self._stop()


def binaries():
    """The folder of initdb and postgres: the newest PostgreSQL installed."""
    def version(path):
        return [int(n) for n in re.findall(r"\d+", path)]

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=version)
    if found:
        return os.path.dirname(found[-1])
    onPath = shutil.which("postgres")
    if onPath and shutil.which("initdb"):
        return os.path.dirname(onPath)
    raise Missing(
        "PostgreSQL is not installed: the store's tests run on it too. Install the"
        f" Debian package postgresql (sudo apt-get install postgresql), or set {ENVIRONMENT}"
        " to the URL of a server whose role may create databases")


def _unprivileged():
    """(uid, gid) to run PostgreSQL as, which refuses to run as root; None if not root."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _child(ids):
    def prepare():
        if ids is not None:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])
        # Linux: the server dies with the test session, even a killed one.
        if sys.platform.startswith("linux"):
            import ctypes

            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    return prepare


def privateCluster():
    """Start a throwaway cluster; returns its L{Server}."""
    bindir = binaries()
    ids = _unprivileged()
    base = tempfile.mkdtemp(prefix="cpushare-pg-")
    if ids is not None:
        os.chown(base, *ids)
    data = os.path.join(base, "data")
    initdb = subprocess.run(
        [os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust",
         "--no-sync", "--no-locale", "-E", "UTF8"],
        capture_output=True, text=True, preexec_fn=_child(ids), cwd=base,
    )
    if initdb.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise Missing(f"initdb failed ({initdb.returncode}): {initdb.stdout}{initdb.stderr}")
    logPath = os.path.join(base, "postgres.log")
    with open(logPath, "wb") as log:
        if ids is not None:
            os.chown(logPath, *ids)
        server = subprocess.Popen(
            [os.path.join(bindir, "postgres"), "-D", data, "-k", base,
             "-c", "listen_addresses=", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_child(ids), cwd=base,
        )

    def stop():
        if server.poll() is None:
            server.send_signal(signal.SIGINT)  # fast shutdown
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        shutil.rmtree(base, ignore_errors=True)

    url = f"postgresql://postgres@/postgres?host={base}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            return Server(url, stop)
        except Missing as e:
            failed = server.poll() is not None or time.monotonic() > deadline
            if failed:
                with open(logPath, errors="replace") as f:
                    output = f.read()
                stop()
                raise Missing(f"the private PostgreSQL server did not start: {e}\n{output}")
            time.sleep(0.05)


def start():
    """The server the tests use: CPUSHARE_TEST_POSTGRES's, or a private cluster."""
    url = os.environ.get(ENVIRONMENT)
    if url:
        return Server(url)
    return privateCluster()
