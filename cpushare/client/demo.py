"""
make demo: a whole CPUShare market on this machine, on loopback.

Builds the reference livecd with a small job inside, starts the market
server, registers a seller and a buyer, starts their programs, places an
order, waits for the VM's DHCP lease, pings the VM through the buyer's
virtual ethernet, shows its console, and stops everything.  The files live
in a temporary folder that is removed at the end (--keep keeps it).  This
is a plain driver script: it runs the real programs as child processes, as
a user would.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from cpushare.protocol.states import VMState

BIN = os.path.dirname(sys.executable)
TAP = "cpushare0"
BOOT_TIMEOUT = 240


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

    def cli(self, home, *args, show=True, stdin=b""):
        result = subprocess.run(
            [exe("cpushare"), "--home", self.path(home), *args],
            capture_output=True, cwd=self.folder, input=stdin,
        )
        stdout = result.stdout.decode("utf-8", "replace")
        if result.returncode != 0:
            raise RuntimeError(
                f"cpushare {' '.join(args)} failed: {result.stderr.decode().strip()}")
        if show:
            for line in stdout.rstrip().splitlines():
                print(f"    {line}")
        return stdout

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
                if child.wait(timeout=20) not in (0, -signal.SIGTERM):
                    unclean.append(f"{name} (exit status {child.returncode})")
            except subprocess.TimeoutExpired:
                unclean.append(f"{name} (did not stop in 20 s; killed)")
                child.kill()
                child.wait()
        self.children = []
        return unclean

    def buildImage(self):
        job = self.path("job")
        os.makedirs(job)
        with open(os.path.join(job, "start"), "w") as f:
            f.write("#!/bin/sh\necho \"hello from the demo job: $(nproc) core(s), "
                    "$(free -m | awk '/Mem:/ {print $2}') MB\"\n")
        os.chmod(os.path.join(job, "start"), 0o755)
        self.say("building the reference livecd with a job inside (cpushare image build)")
        self.cli("buyer-home", "image", "build", "-o", self.path("job.iso"), "--add", job)

    def run(self):
        data = self.path("server-data")
        useTap = os.geteuid() == 0
        self.say(f"working in {self.folder}")
        self.buildImage()
        self.say("starting the market server on 127.0.0.1")
        self.start("server", [
            "cpushare-server", "--data", data,
            "--listen", "tcp:0:interface=127.0.0.1", "--hostname", "localhost",
            "--heartbeat", "1", "--timeout", "10",
            # Bill every 5 s so the demo's few seconds show on the bill; no
            # CPU benchmark VM competing with the demo's own.
            "--billing-interval", "5", "--cpu-bench-every", "0",
        ])
        address = self.waitFor("the server to listen", lambda: self._address(data))
        server = f"127.0.0.1:{address['port']}"
        self.say(f"market server listening on {server}; its CA is {data}/ca.pem")

        for home, name in (("seller-home", "demo-seller"), ("buyer-home", "demo-buyer")):
            self.say(f"registering account {name}")
            self.cli(home, "register", "--server", server,
                     "--ca", os.path.join(data, "ca.pem"), "--name", name)
        self.say("the operator credits the buyer 5.00 of trial funds (cpushare-admin credit)")
        subprocess.run([exe("cpushare-admin"), "--data", data, "credit", "demo-buyer", "5",
                        "--memo", "demo trial credit"], check=True, capture_output=True)

        self.say("starting the seller (2 cores, 1024 MB at 0.36 a core-hour) and the buyer")
        self.start("seller", ["cpushare-seller", "--home", self.path("seller-home"),
                              "--cores", "2", "--memory", "1024", "--price", "0.36"])
        self.start("buyer", ["cpushare-buyer", "--home", self.path("buyer-home"),
                             "--tap", TAP if useTap else "none"])
        if not useTap:
            self.say("not root: no TAP device; the buyer's network is reached through "
                     "its unix socket instead")

        def sellerWithLatency():
            listed = json.loads(self.cli("buyer-home", "sellers", "--json", show=False))
            return [s for s in listed if s.get("latency_ms")]

        self.waitFor("the seller to be online", sellerWithLatency, timeout=60)
        self.say("the buyer asks: cpushare sellers")
        self.cli("buyer-home", "sellers")

        self.say("the buyer uploads the image: cpushare image upload job.iso")
        self.cli("buyer-home", "image", "upload", self.path("job.iso"))
        self.say("the buyer orders a VM: cpushare order place --image job.iso --vms 1")
        ordered = time.monotonic()
        placed = json.loads(self.cli("buyer-home", "order", "place", "--image",
                                     self.path("job.iso"), "--vms", "1", "--cores", "1",
                                     "--memory", "256", "--json", show=False))
        [vm] = placed["vm_ids"]

        def leased():
            for entry in json.loads(self.cli("buyer-home", "vms", "--json", show=False)):
                if entry["vm"] == vm:
                    if entry["state"] in (VMState.FAILED, VMState.STOPPED):
                        raise RuntimeError(f"VM {vm} {entry['state']}: {entry.get('reason')}")
                    return entry.get("ip")
            return None

        ip = self.waitFor("the VM's DHCP lease", leased, timeout=BOOT_TIMEOUT)
        self.say(f"VM {vm} booted and took {ip} by DHCP, "
                 f"{time.monotonic() - ordered:.1f} s after the order")
        self.cli("buyer-home", "vms")
        self.ping(ip, useTap)

        self.say(f"a look at its console: cpushare console {vm}")
        shown = self.cli("buyer-home", "console", str(vm), "--linger", "1", show=False)
        for line in shown.splitlines():
            if line.startswith("CPUSHARE-READY") or "hello from the demo job" in line:
                print(f"    {line.strip()}")

        self.say(f"stopping the order: cpushare order cancel {placed['order']}")
        self.cli("buyer-home", "order", "cancel", str(placed["order"]))

        def settled():
            leases = json.loads(self.cli("buyer-home", "leases", "--json", show=False))
            return leases and all(lease.get("ended") and not lease["held"] for lease in leases)

        self.waitFor("the VM's lease to be settled", settled, timeout=60)
        self.say("what it cost: cpushare leases")
        self.cli("buyer-home", "leases")
        self.say("the buyer's funds: cpushare balance")
        self.cli("buyer-home", "balance")
        self.say("the operator checks the books: cpushare-admin books")
        books = subprocess.run([exe("cpushare-admin"), "--data", data, "books"],
                               capture_output=True, text=True)
        for line in books.stdout.rstrip().splitlines():
            print(f"    {line}")
        if books.returncode != 0:
            raise RuntimeError("the books do not balance")
        self.say("stopping the buyer, the seller and the server")
        unclean = self.stop()
        if unclean:
            raise RuntimeError("did not stop cleanly: " + ", ".join(unclean))
        self.say("done: everything stopped cleanly")

    def ping(self, ip, useTap):
        if useTap:
            self.say(f"pinging {ip} from this machine through the TAP device {TAP}")
            result = subprocess.run(["ping", "-c", "5", "-i", "0.2", "-I", TAP, ip],
                                    capture_output=True, text=True)
            times = [float(t) for t in re.findall(r"time=([0-9.]+) ms", result.stdout)]
        else:
            from cpushare.client.buyer.pinger import UnixSocketPinger
            self.say(f"pinging {ip} through the buyer's unix socket")
            with UnixSocketPinger(self.path("buyer-home", "network.sock"), "10.77.0.50") as p:
                mac = p.arp(ip)
                times = [t * 1000 for t in (p.ping(ip, mac, seq) for seq in range(1, 6))
                         if t is not None]
        if not times:
            raise RuntimeError(f"no ping replies from {ip}")
        self.say(f"{len(times)}/5 replies; round trips (ms): "
                 + ", ".join(f"{t:.2f}" for t in times))

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
    except (RuntimeError, KeyboardInterrupt, OSError) as e:
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
