"""
The reference livecd booted for real: `cpushare image build` makes it from
the Debian parts (downloaded into the user's cache the first time), QEMU
boots it under TCG with slirp's user network (which has a DHCP server; only
for this test: sellers never give a VM that network), and the serial console
shows the readiness line with the DHCP address, the start program's output
and a working shell.  Then a `--base` build of it (a second files layer) and
of an ISO that is not a reference livecd each boot too.

One VM at a time (2 cores, other work running); every QEMU is killed at
teardown.  The boot time to the readiness line is printed (pytest -s).
"""

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pycdlib
import pytest

from cpushare.vm import livecd

QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT = 180.0  # seconds; a boot takes 5-10 s on an idle machine



class Guest:
    """A QEMU process booting an ISO, its serial console on stdin/stdout."""

    def __init__(self, iso):
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [QEMU, "-accel", "tcg", "-nodefaults", "-no-user-config", "-nographic",
             "-m", "256", "-cdrom", iso, "-serial", "stdio",
             "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._position = 0

    def _read(self):
        fd = self.process.stdout.fileno()
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                return
            with self._lock:
                self._output += chunk

    @property
    def output(self):
        with self._lock:
            return self._output.decode("utf-8", "replace")

    def waitFor(self, pattern, timeout=BOOT_TIMEOUT, since=None):
        """
        The first match of C{pattern} after the previous match (or after
        offset C{since} of the console output); fails with the console.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.output
            m = regex.search(text, self._position if since is None else since)
            if m:
                self._position = max(self._position, m.end())
                return m
            if self.process.poll() is not None:
                pytest.fail(f"QEMU exited ({self.process.returncode}) before {pattern!r}:\n{text}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} within {timeout} s on the console:\n{text}")
            time.sleep(0.05)

    def type(self, line):
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self._reader.join(timeout=5)
        self.process.stdin.close()
        self.process.stdout.close()


@pytest.fixture
def boot():
    guests = []

    def start(iso):
        assert all(g.process.poll() is not None for g in guests), "one VM at a time"
        guest = Guest(str(iso))
        guests.append(guest)
        return guest

    yield start
    for guest in guests:
        guest.stop()


def cli(*args):
    done = subprocess.run(
        [sys.executable, "-c", "from cpushare.client.cli.main import main; main()", *args],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, f"cpushare {' '.join(args)} failed:\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("livecd")


@pytest.fixture(scope="module")
def jobISO(folder):
    job = folder / "job"
    (job / "lib").mkdir(parents=True)
    (job / "lib" / "input.txt").write_text("payload-7f3a\n")
    (job / "start").write_text(
        "#!/bin/sh\n"
        'echo "job says: $(cat lib/input.txt) on $CPUSHARE_IP from $(pwd)"\n'
        "exit 3\n"
    )
    (job / "start").chmod(0o755)
    iso = folder / "job.iso"
    done = cli("image", "build", "-o", str(iso), "--add", str(job))
    assert done.stdout.startswith(f"wrote {iso}: reference livecd (Linux ")
    return iso


def test_the_livecd_takes_a_dhcp_address_and_runs_start(boot, jobISO):
    guest = boot(jobISO)
    line = guest.waitFor(r"CPUSHARE-READY [^\r\n]*\r?\n")
    seconds = time.monotonic() - guest.started
    ready = livecd.parseReady(line.group(0))
    assert ready is not None, line.group(0)
    assert ready["mac"] == "52:54:00:12:34:56"  # QEMU's default for the first NIC
    assert ready["ip"] == "10.0.2.15/24"        # slirp's DHCP lease
    assert ready["gw"] == "10.0.2.2"
    print(f"\nboot to readiness line: {seconds:.1f} s (guest kernel uptime {ready['uptime']:.2f} s); "
          f"ISO {os.path.getsize(jobISO) / 1e6:.1f} MB")

    guest.waitFor(r"job says: payload-7f3a on 10\.0\.2\.15/24 from /cpushare")
    assert guest.waitFor(livecd.START_EXIT.pattern).group("status") == "3"

    # busybox init's shell on ttyS0; start runs beside it, so either may print first
    guest.waitFor(r"cpushare:/cpushare# ", since=line.end())
    guest.type("echo $((6 * 7))-from-the-shell; cat /etc/resolv.conf")
    guest.waitFor(r"42-from-the-shell")
    guest.waitFor(r"nameserver 10\.0\.2\.3")
    guest.type("poweroff")
    guest.process.wait(timeout=60)


def test_a_second_layer_added_with_base_boots(boot, folder, jobISO):
    more = folder / "more"
    more.mkdir()
    (more / "more.txt").write_text("second-layer\n")
    (more / "start").write_text(
        "#!/bin/sh\n"
        'echo "layers: $(cat lib/input.txt) $(cat more.txt)"\n'
    )
    (more / "start").chmod(0o755)
    iso = folder / "more.iso"
    done = cli("image", "build", "--base", str(jobISO), "--add", str(more), "-o", str(iso))
    assert "in initrd layer 2" in done.stdout

    guest = boot(iso)
    ready = livecd.parseReady(guest.waitFor(r"CPUSHARE-READY [^\r\n]*\r?\n").group(0))
    assert ready["ip"] == "10.0.2.15/24"
    guest.waitFor(r"layers: payload-7f3a second-layer")
    assert guest.waitFor(livecd.START_EXIT.pattern).group("status") == "0"


def test_files_added_to_another_iso_keep_it_bootable(boot, folder, jobISO):
    # another isolinux ISO: the reference livecd without its marker file
    other = folder / "other.iso"
    iso = pycdlib.PyCdlib()
    iso.open(str(jobISO))
    iso.rm_file(iso_path=livecd.MARKER_ISO)
    iso.write(str(other))
    iso.close()
    extra = folder / "extra"
    extra.mkdir()
    (extra / "notes.txt").write_text("on the cdrom\n")
    out = folder / "other-plus.iso"
    done = cli("image", "build", "--base", str(other), "--add", str(extra), "-o", str(out))
    assert "files added under /cpushare/ on the cdrom" in done.stdout

    guest = boot(out)
    ready = livecd.parseReady(guest.waitFor(r"CPUSHARE-READY [^\r\n]*\r?\n").group(0))
    assert ready["ip"] == "10.0.2.15/24"
    guest.waitFor(r"job says: payload-7f3a")
