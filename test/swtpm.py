"""
Software TPMs for the tests: one swtpm per test, in socket mode on free
ports of 127.0.0.1, made by swtpm_setup with an endorsement key certificate
and a platform certificate signed by a test CA of the test's own (a key and
certificate made here with `cryptography`, in the test's tmp folder: never
/var/lib/swtpm-localca).  The market trusts that CA only when a test says so.

A fresh swtpm's boot PCRs are all zero, as if no firmware had run; so the
fixture plays a small synthetic boot: it writes a TCG crypto-agile event log
(`boot.log`, L{BOOT_EVENTS}: firmware, a separator per PCR, one boot
application as the kernel) and extends PCRs 0-7 with it, so quotes cover a
boot chain that replays.  `swtpms.make(boot=False)` gives a TPM without one.

    def test_x(swtpms):
        tpm = swtpms.make()            # a SoftwareTPM: .spec, .eventLog, .ca
        other = swtpms.make()          # a second, different TPM (same CA)
        tpm.ca                         # the CA certificate (cryptography)
"""

import datetime
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

START_TIMEOUT = 10.0
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_S_CRTM_VERSION = 0x8
EV_POST_CODE = 0x1
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
TPM_ALG_SHA1, TPM_ALG_SHA256 = 0x0004, 0x000B

BOOT_EVENTS = [
    (0, EV_S_CRTM_VERSION, b"CPUShare test firmware 1.0"),
    (0, EV_POST_CODE, b"POST CODE"),
    (1, EV_EFI_VARIABLE_DRIVER_CONFIG, b"SecureBoot=1"),
    *[(pcr, EV_SEPARATOR, b"\x00\x00\x00\x00") for pcr in range(8)],
    (4, EV_EFI_BOOT_SERVICES_APPLICATION, b"test vmlinuz"),
]
"""(PCR, TCG event type, measured data) of the synthetic boot, in order."""


def makeCA(folder, name="CPUShare test TPM CA"):
    """(key, certificate) of a new self-signed CA, also written to FOLDER/ca.key and ca.pem."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256()))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ca.key"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    with open(os.path.join(folder, "ca.pem"), "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return key, certificate


def tcgLog(events):
    """A TCG crypto-agile event log (sha1 and sha256 banks) of C{events}: (pcr, type, data)."""
    algorithms = [(TPM_ALG_SHA1, 20), (TPM_ALG_SHA256, 32)]
    spec = (b"Spec ID Event03\x00" + struct.pack("<IBBBB", 0, 0, 2, 0, 2)
            + struct.pack("<I", len(algorithms)) + b"".join(struct.pack("<HH", *a) for a in algorithms)
            + b"\x00")
    out = [struct.pack("<II20sI", 0, EV_NO_ACTION, bytes(20), len(spec)), spec]
    for pcr, eventType, data in events:
        out.append(struct.pack("<III", pcr, eventType, 2))
        out.append(struct.pack("<H", TPM_ALG_SHA1) + hashlib.sha1(data).digest())
        out.append(struct.pack("<H", TPM_ALG_SHA256) + hashlib.sha256(data).digest())
        out.append(struct.pack("<I", len(data)) + data)
    return b"".join(out)


def _freePorts():
    """Two consecutive free TCP ports on 127.0.0.1 (the server's and the control's)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


class SoftwareTPM:
    """One running swtpm: C{spec} for cpushare.attest.tpm.open, C{eventLog} its boot log's path, C{ca}."""

    def __init__(self, folder, ca, caFolder, boot=True):
        self.folder = folder
        self.ca = ca
        self.state = os.path.join(folder, "state")
        os.makedirs(self.state)
        self._setup(caFolder)
        self.port = None
        self.process = None
        self._start()
        self.eventLog = None
        if boot:
            self.eventLog = os.path.join(folder, "boot.log")
            with open(self.eventLog, "wb") as f:
                f.write(tcgLog(BOOT_EVENTS))
            try:
                self.extendBoot(BOOT_EVENTS)
            except BaseException:
                self.stop()
                raise

    @property
    def spec(self):
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def _setup(self, caFolder):
        conf = lambda name, text: self._write(name, text)  # noqa: E731
        localca = conf("swtpm-localca.conf", (
            f"statedir = {caFolder}\nsigningkey = {caFolder}/ca.key\n"
            f"issuercert = {caFolder}/ca.pem\ncertserial = {caFolder}/certserial\n"))
        options = conf("swtpm-localca.options", (
            "--platform-manufacturer CPUShare\n--platform-version 2.1\n--platform-model test\n"))
        setup = conf("swtpm_setup.conf", (
            f"create_certs_tool = {shutil.which('swtpm_localca')}\n"
            f"create_certs_tool_config = {localca}\ncreate_certs_tool_options = {options}\n"
            "active_pcr_banks = sha256\n"))
        log = os.path.join(self.folder, "swtpm_setup.log")
        result = subprocess.run(
            ["swtpm_setup", "--tpm2", "--tpmstate", self.state, "--create-ek-cert",
             "--create-platform-cert", "--config", setup, "--logfile", log],
            capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": self.folder})
        if result.returncode != 0:
            with open(log) as f:
                raise RuntimeError(f"swtpm_setup failed: {result.stdout}{result.stderr}{f.read()}")

    def _write(self, name, text):
        path = os.path.join(self.folder, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def _start(self):
        for _ in range(5):
            port = _freePorts()
            log = open(os.path.join(self.folder, "swtpm.log"), "ab")
            process = subprocess.Popen(
                ["swtpm", "socket", "--tpm2",
                 "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                 "--tpmstate", f"dir={self.state}", "--flags", "not-need-init,startup-clear"],
                stdout=log, stderr=log)
            log.close()
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    time.sleep(0.02)
                    continue
                self.port, self.process = port, process
                return
            process.kill()
            process.wait()
        with open(os.path.join(self.folder, "swtpm.log"), "rb") as f:
            raise RuntimeError(f"swtpm did not start: {f.read().decode(errors='replace')}")

    def extendBoot(self, events):
        """Extend the PCRs with C{events} (pcr, type, data), as firmware would."""
        from tpm2_pytss import ESAPI, TCTILdr
        from tpm2_pytss.constants import ESYS_TR

        from cpushare.attest.tpm import sha256Extension
        tcti = TCTILdr("swtpm", f"host=127.0.0.1,port={self.port}")
        esapi = ESAPI(tcti)
        try:
            for pcr, eventType, data in events:
                if eventType == EV_NO_ACTION:
                    continue
                esapi.pcr_extend(getattr(ESYS_TR, f"PCR{pcr}"), sha256Extension(hashlib.sha256(data).digest()))
        finally:
            esapi.close()
            tcti.close()

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class SoftwareTPMs:
    """The software TPMs of one test, all signed by its test CA; ended at teardown."""

    def __init__(self, folder):
        self.folder = str(folder)
        self.caFolder = os.path.join(self.folder, "tpm-ca")
        self.caKey, self.ca = makeCA(self.caFolder)
        self.tpms = []

    def make(self, boot=True):
        """A new, different software TPM (its own EK, certified by the test CA)."""
        folder = os.path.join(self.folder, f"swtpm{len(self.tpms)}")
        os.makedirs(folder)
        tpm = SoftwareTPM(folder, self.ca, self.caFolder, boot=boot)
        self.tpms.append(tpm)
        return tpm

    def stop(self):
        for tpm in self.tpms:
            tpm.stop()


@pytest.fixture
def swtpms(tmp_path):
    """L{SoftwareTPMs} for this test: C{swtpms.make()} starts one."""
    tpms = SoftwareTPMs(tmp_path)
    yield tpms
    tpms.stop()
