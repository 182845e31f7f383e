"""A secured federation's credentials: the CA signs a server certificate for the hosts nodes dial,
and node keys are EC P-384 in OpenSSH format, private parts readable by their owner only."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.runtime.certs import make_node_key, make_tls

pytestmark = pytest.mark.unit


def test_the_ca_signs_a_server_certificate_for_the_hosts(tmp_path):
    files = make_tls(tmp_path / "certs", hosts=("127.0.0.1", "localhost", "node.example"))
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "node.example"]
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for private in (files.ca_key, files.server_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    other = make_tls(tmp_path / "other")
    other_server = x509.load_pem_x509_certificate(other.server_cert.read_bytes())
    with pytest.raises((InvalidSignature, ValueError)):
        other_server.verify_directly_issued_by(ca)  # another federation's CA did not sign it
    with pytest.raises(ValueError, match="at least one host"):
        make_tls(tmp_path / "none", hosts=())


def test_node_keys_are_p384_in_openssh_format(tmp_path):
    private, public = make_node_key(tmp_path, "node-0")
    text = public.read_text()
    assert text.startswith("ecdsa-sha2-nistp384 ") and text.endswith(" fedtune-node-0\n")
    loaded = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey) and loaded.curve.name == "secp384r1"
    assert serialization.load_ssh_public_key(public.read_bytes()).public_numbers() == (
        loaded.public_key().public_numbers()
    )
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    _, second = make_node_key(tmp_path, "node-1")
    assert second.read_text().split()[1] != text.split()[1]  # a key of its own
