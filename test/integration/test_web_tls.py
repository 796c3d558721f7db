"""
The web port as a scanner sees it: testssl.sh (Debian's testssl.sh
package, tools/host-deps.sh installs it) against a real cpushare-server's
web port on loopback, with a certificate like one a public market would
have (short-lived, naming where its revocation list is).  No finding may
be MEDIUM or worse.

The scan stays on this machine: testssl is given the address (--ip), makes
no DNS lookups (--nodns none) and fetches no revocation list or OCSP answer
(no --phone-out).  test/unit/test_web_tls.py checks the same TLS context
and headers in memory, in a fraction of a second.
"""

import datetime
import json
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cpushare import pki

from .conftest import LOOPBACK, Market

WEAK = ("MEDIUM", "HIGH", "CRITICAL")
# The checks: protocols, cipher categories, forward secrecy, the server's
# preferences, its defaults (certificate, session tickets), the HTTP headers
# and the known vulnerabilities.  (Not the client simulations nor each of
# 370 ciphers one by one: the categories cover them, in a third of the time.)
CHECKS = ["-p", "-s", "-f", "-P", "-S", "-h", "-U"]
SCAN_TIMEOUT = 600


def publicLikeCertificate(folder):
    """
    A CA and, signed by it, a 90-day certificate for localhost naming a
    revocation list (on loopback, never fetched): what testssl expects of a
    certificate from a public CA.  Returns (ca, cert, key) paths.
    """
    caKey, caCert = pki.createAuthority("web test CA")
    key = pki.generateKey()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                       critical=False)
        .add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(f"http://{LOOPBACK}:9/web.crl")],
            relative_name=None, reasons=None, crl_issuer=None)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            caKey.public_key()), critical=False)
        .sign(caKey, hashes.SHA256())
    )
    paths = folder / "web-ca.pem", folder / "web-cert.pem", folder / "web-key.pem"
    paths[0].write_bytes(pki.certToPEM(caCert))
    paths[1].write_bytes(pki.certToPEM(cert))
    paths[2].write_bytes(pki.keyToPEM(key))
    paths[2].chmod(0o600)
    return paths


def test_testssl_finds_nothing_weak_on_the_web_port(processes, tmp_path):
    testssl = shutil.which("testssl") or shutil.which("testssl.sh")
    if testssl is None:
        pytest.fail("this test needs Debian's testssl.sh: run tools/host-deps.sh as root "
                    "(or apt-get install testssl.sh)")
    ca, cert, key = publicLikeCertificate(tmp_path)
    market = Market(processes, tmp_path / "market", extra=[
        "--web", f"tcp:0:interface={LOOPBACK}", "--web-cert", cert, "--web-key", key,
    ]).start()
    port = json.loads((market.data / "web.address").read_text())["port"]
    report = tmp_path / "testssl.json"
    done = subprocess.run(
        [testssl, "--quiet", "--color", "0", "--warnings", "off", "--nodns", "none",
         "--ip", LOOPBACK, "--add-ca", str(ca), "--connect-timeout", "10",
         "--openssl-timeout", "10", "--jsonfile", str(report), *CHECKS,
         f"localhost:{port}"],
        capture_output=True, text=True, timeout=SCAN_TIMEOUT, cwd=tmp_path)
    assert report.exists(), f"testssl wrote no report:\n{done.stdout[-3000:]}{done.stderr}"
    findings = json.loads(report.read_text())
    byId = {f["id"]: f for f in findings}
    # The scan did reach the port and test what matters.
    for checked in ("TLS1_3", "cipherlist_AVERAGE", "banner_server", "LUCKY13",
                    "sessionresumption_ticket"):
        assert checked in byId, f"testssl did not report {checked}:\n{done.stdout[-3000:]}"
    weak = [f"{f['severity']} {f['id']}: {f['finding']}" for f in findings
            if f["severity"] in WEAK]
    assert weak == [], "\n".join(weak)
    assert byId["TLS1"]["finding"] == "not offered"
    assert byId["TLS1_1"]["finding"] == "not offered"
    assert byId["cipherlist_AVERAGE"]["finding"] == "not offered"
    assert byId["LUCKY13"]["finding"] == "not vulnerable"
    assert byId["sessionresumption_ticket"]["finding"] == "not supported"
    assert "HSTS_time" in byId and byId["HSTS_time"]["severity"] == "OK", byId.get("HSTS")
    assert byId["banner_server"]["finding"].startswith("No Server banner")
