"""
make demo: a whole CPUShare market on this machine, on loopback.

Starts the market server, registers a seller and a buyer, starts their
programs, shows what `cpushare sellers` shows, and stops everything.  All
files live in a temporary folder that is removed at the end (--keep keeps
it).  This is a plain driver script: it runs the real programs as child
processes, as a user would.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)


def exe(name):
    return os.path.join(BIN, name)


class Demo:
    def __init__(self, folder):
        self.folder = folder
        self.children = []

    def path(self, *parts):
        return os.path.join(self.folder, *parts)

    def say(self, text):
        print(f"demo: {text}", flush=True)

    def start(self, name, args):
        log = open(self.path(f"{name}.log"), "wb")
        child = subprocess.Popen(
            [exe("twistd"), "-n", "--pidfile=", *args],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
        )
        self.children.append((name, child))
        return child

    def cli(self, home, *args, show=True):
        result = subprocess.run(
            [exe("cpushare"), "--home", self.path(home), *args],
            capture_output=True, text=True, cwd=self.folder,
        )
        if result.returncode != 0:
            raise RuntimeError(f"cpushare {' '.join(args)} failed: {result.stderr.strip()}")
        if show:
            for line in result.stdout.rstrip().splitlines():
                print(f"    {line}")
        return result.stdout

    def waitFor(self, what, check, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, child in self.children:
                if child.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with status {child.returncode}; "
                        f"see {self.path(name + '.log')}:\n" + self.tail(name)
                    )
            value = check()
            if value:
                return value
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}")

    def tail(self, name, lines=20):
        with open(self.path(f"{name}.log"), errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def stop(self):
        """Stop every program; returns the names of those that did not stop cleanly."""
        unclean = []
        for name, child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for name, child in reversed(self.children):
            try:
                # twistd shuts down cleanly on SIGTERM and then exits by
                # that signal, as the convention for signalled programs is.
                if child.wait(timeout=15) not in (0, -signal.SIGTERM):
                    unclean.append(f"{name} (exit status {child.returncode})")
            except subprocess.TimeoutExpired:
                unclean.append(f"{name} (did not stop in 15 s; killed)")
                child.kill()
                child.wait()
        self.children = []
        return unclean

    def run(self):
        data = self.path("server-data")
        self.say(f"working in {self.folder}")
        self.say("starting the market server on 127.0.0.1")
        self.start("server", [
            "cpushare-server", "--data", data,
            "--listen", "tcp:0:interface=127.0.0.1", "--hostname", "localhost",
            "--heartbeat", "1", "--timeout", "10",
        ])
        address = self.waitFor("the server to listen", lambda: self._address(data))
        server = f"127.0.0.1:{address['port']}"
        self.say(f"market server listening on {server}; its CA is {data}/ca.pem")

        for home, name in (("seller-home", "demo-seller"), ("buyer-home", "demo-buyer")):
            self.say(f"registering account {name}")
            self.cli(home, "register", "--server", server,
                     "--ca", os.path.join(data, "ca.pem"), "--name", name)

        self.say("starting the seller (2 cores, 1024 MB on offer) and the buyer")
        self.start("seller", ["cpushare-seller", "--home", self.path("seller-home"),
                              "--cores", "2", "--memory", "1024"])
        self.start("buyer", ["cpushare-buyer", "--home", self.path("buyer-home")])

        def sellerWithLatency():
            listed = json.loads(self.cli("buyer-home", "sellers", "--json", show=False))
            return [s for s in listed if s.get("latency_ms")]

        self.waitFor("the seller to be online with a measured latency", sellerWithLatency)
        self.say("the buyer asks: cpushare sellers")
        self.cli("buyer-home", "sellers")
        self.say("the buyer's account: cpushare whoami")
        self.cli("buyer-home", "whoami")
        self.say("stopping the buyer, the seller and the server")
        unclean = self.stop()
        if unclean:
            raise RuntimeError("did not stop cleanly: " + ", ".join(unclean))
        self.say("done: everything stopped cleanly")

    def _address(self, data):
        try:
            with open(os.path.join(data, "server.address")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


def main(argv=None):
    p = argparse.ArgumentParser(prog="cpushare-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="cpushare-demo-")
    demo = Demo(folder)
    try:
        demo.run()
    except (RuntimeError, KeyboardInterrupt) as e:
        print(f"demo: failed: {e}", file=sys.stderr)
        for name, _ in demo.children:
            print(f"--- last lines of {name}.log ---\n{demo.tail(name)}", file=sys.stderr)
        demo.stop()
        return 1
    finally:
        if args.keep:
            print(f"demo: files kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
