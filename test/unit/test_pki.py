"""The certificate authority and the certificates it signs."""

import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from cpushare import pki
from cpushare.server.credentials import loadOrCreate


def test_client_certificate_is_signed_for_the_account_and_for_client_use():
    caKey, caCert = pki.createAuthority("test CA")
    key = pki.generateKey()
    certPEM = pki.signClientRequest(caKey, caCert, pki.makeRequest(key, "alice"), "alice")
    cert = pki.loadCertificate(certPEM)
    assert cert.issuer == caCert.subject
    cert.verify_directly_issued_by(caCert)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "alice"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize("csr, words", [
    (b"not a request", "does not parse"),
    (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     "does not parse"),
])
def test_garbage_requests_are_refused(csr, words):
    caKey, caCert = pki.createAuthority("test CA")
    with pytest.raises(pki.BadRequest, match=words):
        pki.signClientRequest(caKey, caCert, csr, "alice")


def test_weak_keys_are_refused():
    caKey, caCert = pki.createAuthority("test CA")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(pki.BadRequest, match="2048"):
        pki.signClientRequest(caKey, caCert, pki.makeRequest(weak, "bob"), "bob")
    small = ec.generate_private_key(ec.SECP192R1())
    with pytest.raises(pki.BadRequest, match="256"):
        pki.signClientRequest(caKey, caCert, pki.makeRequest(small, "bob"), "bob")


def test_localhost_server_certificate_covers_loopback_addresses():
    caKey, caCert = pki.createAuthority("test CA")
    _, cert = pki.issueServerCertificate(caKey, caCert, "localhost")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


def test_private_files_are_owner_only(tmp_path):
    path = str(tmp_path / "key.pem")
    pki.writePrivate(path, b"secret")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert open(path, "rb").read() == b"secret"


def test_server_credentials_are_created_once_and_reissued_for_a_new_hostname(tmp_path):
    data = str(tmp_path / "data")
    first = loadOrCreate(data, "localhost")
    assert stat.S_IMODE(os.stat(os.path.join(data, "ca-key.pem")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(data, "server-key.pem")).st_mode) == 0o600
    again = loadOrCreate(data, "localhost")
    assert again.caPEM == first.caPEM and again.certPEM == first.certPEM
    moved = loadOrCreate(data, "market.example")
    assert moved.caPEM == first.caPEM, "users' ca.pem keeps working"
    assert moved.certPEM != first.certPEM
    cert = pki.loadCertificate(moved.certPEM)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["market.example"]
