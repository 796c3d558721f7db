"""
The web port as a scanner sees it: testssl.sh (Debian's testssl.sh
package, tools/host-deps.sh installs it) against a real cpushare-server's
web port on loopback, once on the market's defaults (its own CA's
certificate, which testssl is given as a user is given ca.pem) and once
with an operator's certificate (--web-cert, like one from a public CA).
No finding may be MEDIUM or worse.  On its defaults the market also serves
its CA's revocation list there, which lists a certificate within seconds
of cpushare-admin revoking it.

The scan stays on this machine: testssl is given the address (--ip), makes
no DNS lookups (--nodns none) and fetches no revocation list or OCSP answer
(no --phone-out).  test/unit/test_web_tls.py checks the same TLS context
and headers in memory, in a fraction of a second.
"""

import datetime
import json
import shutil
import ssl
import subprocess
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cpushare import pki

from .conftest import LOOPBACK, Market, waitUntil

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


def webPort(market):
    return json.loads((market.data / "web.address").read_text())["port"]


CONNECT_PROBLEM = "check failed because of connect problem"


def scan(tmp_path, port, ca, checks, path=""):
    """
    testssl's findings on the web port (its headers checks on the page at
    C{path}), by id, after asserting none is MEDIUM or worse.

    A check that testssl could not finish because one of its many
    connections timed out (a busy two-core machine) says so instead of a
    finding; the scan then runs once more, and a second such answer fails.
    """
    byId = _scan(tmp_path, port, ca, checks, path)
    if any(f["finding"] == CONNECT_PROBLEM for f in byId.values()):
        byId = _scan(tmp_path, port, ca, checks, path)
    failed = [i for i, f in byId.items() if f["finding"] == CONNECT_PROBLEM]
    assert failed == [], f"testssl could not connect for {failed}"
    return byId


def _scan(tmp_path, port, ca, checks, path):
    testssl = shutil.which("testssl") or shutil.which("testssl.sh")
    if testssl is None:
        pytest.fail("this test needs Debian's testssl.sh: run tools/host-deps.sh as root "
                    "(or apt-get install testssl.sh)")
    report = tmp_path / "testssl.json"
    report.unlink(missing_ok=True)      # testssl will not write over a report
    done = subprocess.run(
        [testssl, "--quiet", "--color", "0", "--warnings", "off", "--nodns", "none",
         "--ip", LOOPBACK, "--add-ca", str(ca), "--connect-timeout", "10",
         "--openssl-timeout", "10", "--jsonfile", str(report), *checks,
         f"localhost:{port}{path}"],
        capture_output=True, text=True, timeout=SCAN_TIMEOUT, cwd=tmp_path)
    assert report.exists(), f"testssl wrote no report:\n{done.stdout[-3000:]}{done.stderr}"
    findings = json.loads(report.read_text())
    byId = {f["id"]: f for f in findings}
    for checked in ("TLS1_3", "banner_server", "cert_validityPeriod",
                    "cert_crlDistributionPoints"):
        assert checked in byId, f"testssl did not report {checked}:\n{done.stdout[-3000:]}"
    weak = [f"{f['severity']} {f['id']}: {f['finding']}" for f in findings
            if f["severity"] in WEAK]
    assert weak == [], "\n".join(weak)
    assert byId["TLS1"]["finding"] == "not offered"
    assert byId["TLS1_1"]["finding"] == "not offered"
    assert byId["cert_chain_of_trust"]["severity"] == "OK", byId["cert_chain_of_trust"]
    assert "HSTS_time" in byId and byId["HSTS_time"]["severity"] == "OK", byId.get("HSTS")
    assert byId["banner_server"]["finding"].startswith("No Server banner")
    return byId


def revocationList(url, ca):
    """The list at C{url}, fetched over TLS checked against C{ca}, as a user's tool would."""
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        assert response.headers["content-type"] == "application/pkix-crl"
        return x509.load_der_x509_crl(response.read())


def test_a_market_on_its_defaults_passes_testssl_and_lists_revoked_certificates(
        processes, tmp_path):
    market = Market(processes, tmp_path / "market", extra=[
        "--web", f"tcp:0:interface={LOOPBACK}"]).start()
    port = webPort(market)
    crlUrl = f"https://localhost:{port}/ca.crl"
    caCert = pki.loadCertificate(market.ca.read_bytes())

    # The certificates the market's CA issues name its list on the web port.
    server = pki.loadCertificate((market.data / "server.pem").read_bytes())
    assert pki.crlUrlOf(server) == crlUrl
    alice = market.register(tmp_path / "alice", "alice", funds=None)
    bob = market.register(tmp_path / "bob", "bob", funds=None)
    aliceCert = pki.loadCertificate((alice / "cert.pem").read_bytes())
    bobCert = pki.loadCertificate((bob / "cert.pem").read_bytes())
    assert pki.crlUrlOf(aliceCert) == crlUrl
    crl = revocationList(crlUrl, market.ca)
    assert crl.is_signature_valid(caCert.public_key())
    assert len(crl) == 0

    revoked = market.admin("revoke", "alice")
    assert revoked.status == 0, revoked
    waitUntil(lambda: revocationList(crlUrl, market.ca).get_revoked_certificate_by_serial_number(
        aliceCert.serial_number) is not None, "alice's certificate in the revocation list",
        timeout=10, processes=processes)
    crl = revocationList(crlUrl, market.ca)
    assert crl.is_signature_valid(caCert.public_key())
    assert crl.get_revoked_certificate_by_serial_number(bobCert.serial_number) is None

    byId = scan(tmp_path, port, market.ca, CHECKS)
    for checked in ("cipherlist_AVERAGE", "LUCKY13", "sessionresumption_ticket"):
        assert checked in byId, f"testssl did not report {checked}"
    assert byId["cipherlist_AVERAGE"]["finding"] == "not offered"
    assert byId["LUCKY13"]["finding"] == "not vulnerable"
    assert byId["sessionresumption_ticket"]["finding"] == "not supported"
    assert byId["cert_crlDistributionPoints"]["finding"] == crlUrl
    assert int(byId["cert_serialNumber"]["finding"], 16) == server.serial_number


def test_a_market_with_an_operators_certificate_passes_testssl(processes, tmp_path):
    ca, cert, key = publicLikeCertificate(tmp_path)
    market = Market(processes, tmp_path / "market", extra=[
        "--web", f"tcp:0:interface={LOOPBACK}", "--web-cert", cert, "--web-key", key,
    ]).start()
    # The TLS settings are the defaults' (scanned above): here the
    # certificate, the protocols and the headers of the site's login page,
    # which sets a cookie (the login form's CSRF token).
    byId = scan(tmp_path, webPort(market), ca, ["-p", "-S", "-h"], path="/login")
    assert byId["cookie_count"]["finding"].startswith("1 at '/login'"), byId["cookie_count"]
    assert byId["cookie_secure"]["severity"] == "OK", byId["cookie_secure"]
    assert byId["cookie_httponly"]["severity"] == "OK", byId["cookie_httponly"]
    served = pki.loadCertificate(cert.read_bytes())
    assert int(byId["cert_serialNumber"]["finding"], 16) == served.serial_number
    assert byId["cert_crlDistributionPoints"]["finding"] == f"http://{LOOPBACK}:9/web.crl"
