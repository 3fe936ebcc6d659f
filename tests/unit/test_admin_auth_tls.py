"""Bearer-token file handling, certificate generation, and AdminService on a MemoryReactor."""

from __future__ import annotations

import ipaddress
import os

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import CollectorRegistry
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger
from twisted.web.test.requesthelper import DummyRequest

from appliance.admin import MethodRegistry
from appliance.admin.auth import AllowAll, BearerTokenAuth, TokenFileError
from appliance.admin.service import AdminListenError, AdminService, AdminSettings
from appliance.net.tls import (client_options, make_ca, make_cert, server_options,
                               split_pem_certs, write_pem)


def request_with(authorization: bytes | None) -> DummyRequest:
    req = DummyRequest([])
    if authorization is not None:
        req.requestHeaders.setRawHeaders(b"authorization", [authorization])
    return req


# -- token file -----------------------------------------------------------
def test_token_created_atomically_private(tmp_path):
    """A missing token file is created (with its directories) mode 0600 holding the token."""
    auth = BearerTokenAuth(tmp_path / "a" / "b" / "admin.token")
    token = auth.load_or_create()
    path = tmp_path / "a" / "b" / "admin.token"
    assert path.read_text() == token + "\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(token) >= 40
    assert BearerTokenAuth(path).load_or_create() == token


def test_existing_token_is_stripped(tmp_path):
    """An existing private token file is read with whitespace stripped."""
    path = tmp_path / "admin.token"
    path.write_text("  abc-123 \n")
    os.chmod(path, 0o600)
    assert BearerTokenAuth(path).load_or_create() == "abc-123"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_loose_token_file_is_refused(tmp_path, mode):
    """A token file group/others may access is refused with a clear error (was a warning)."""
    path = tmp_path / "admin.token"
    path.write_text("abc-123\n")
    os.chmod(path, mode)
    with pytest.raises(TokenFileError) as info:
        BearerTokenAuth(path).load_or_create()
    assert str(info.value) == (f"admin token file {path}: accessible by group/others "
                               f"(mode {oct(mode)}); run: chmod 600 {path}")


@pytest.mark.parametrize("content, message", [("", "is empty"), ("two words", "one word")])
def test_bad_token_files(tmp_path, content, message):
    """Empty or multi-word token files are refused with a message naming the file."""
    path = tmp_path / "admin.token"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(TokenFileError, match=message) as info:
        BearerTokenAuth(path).load_or_create()
    assert str(path) in str(info.value)


def test_unwritable_directory(tmp_path):
    """A token file that cannot be created is a TokenFileError naming it."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TokenFileError, match="cannot"):
        BearerTokenAuth(blocker / "admin.token").load_or_create()


@pytest.mark.parametrize("header, ok", [
    (b"Bearer TOKEN", True), (b"bearer TOKEN", True), (b"Bearer  TOKEN ", True),
    (b"Bearer TOKENX", False), (b"Bearer", False), (b"Basic TOKEN", False), (b"TOKEN", False),
    (None, False), (b"Bearer \xff", False),
])
def test_check(tmp_path, header, ok):
    """Only `Authorization: Bearer <token>` (scheme case-insensitive) passes."""
    path = tmp_path / "admin.token"
    path.write_text("TOKEN\n")
    os.chmod(path, 0o600)
    auth = BearerTokenAuth(path)
    auth.load_or_create()
    assert auth.check(request_with(header)) is ok


def test_check_before_load_refuses(tmp_path):
    """Before the token is loaded nothing passes; AllowAll lets everything in."""
    assert BearerTokenAuth(tmp_path / "t").check(request_with(b"Bearer x")) is False
    assert AllowAll().check(request_with(None)) is True


# -- certificates -----------------------------------------------------------
def test_make_cert_fields():
    """Leaf certs are EC P-256, CA-signed, with SAN DNS+IP and EKU serverAuth+clientAuth."""
    ca_pem, ca_key = make_ca("test CA")
    cert_pem, key_pem = make_cert(ca_pem, ca_key, "node-a", dns_names=("node-a", "a.local"),
                                  ips=("10.9.0.1", "fd00::1"))
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-a", "a.local"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.9.0.1"),
                                                       ipaddress.ip_address("fd00::1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.public_key().curve.name == "secp256r1"
    assert b"PRIVATE KEY" in key_pem
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_write_pem_modes(tmp_path):
    """Keys are written 0600, certificates 0644, atomically (no temp files left)."""
    key = write_pem(tmp_path / "d" / "k.pem", b"key", private=True)
    cert = write_pem(tmp_path / "d" / "c.pem", b"cert")
    assert key.stat().st_mode & 0o777 == 0o600 and key.read_bytes() == b"key"
    assert cert.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["c.pem", "k.pem"]


def test_context_helpers_build():
    """server_options/client_options build contexts; a CA bundle with two certs is accepted."""
    ca1, ca1_key = make_ca("one")
    ca2, _ = make_ca("two")
    cert, key = make_cert(ca1, ca1_key, "127.0.0.1")
    assert len(split_pem_certs(ca1 + ca2)) == 2
    assert server_options(cert, key).getContext() is not None
    assert server_options(cert, key, ca1 + ca2).getContext() is not None
    assert client_options("127.0.0.1", ca1 + ca2, cert, key) is not None
    with pytest.raises(ValueError):
        client_options("127.0.0.1", ca1, cert)


# -- the service on a MemoryReactor -------------------------------------------
def test_service_listens_on_the_endpoint(tmp_path):
    """startService creates the token and listens per the endpoint string; stop closes it."""
    reactor = MemoryReactor()
    svc = AdminService(reactor, AdminSettings(listen="tcp:8740:interface=127.0.0.1",
                                              token_file=str(tmp_path / "t")),
                       MethodRegistry(), CollectorRegistry())
    svc._log = Logger(observer=lambda e: None)
    d = svc.startService()
    port, factory, backlog, interface = reactor.tcpServers[0]
    assert (port, interface) == (8740, "127.0.0.1")
    assert factory is svc.site
    assert (tmp_path / "t").exists()
    assert svc.port is not None and svc.running
    fired = []
    d.addCallback(fired.append)
    assert fired
    svc.stopService()
    assert not svc.running and svc.port is None


def test_service_bad_token_dir_fails_cleanly(tmp_path):
    """An unusable token file fails startService with AdminListenError; nothing listens."""
    (tmp_path / "file").write_text("x")
    reactor = MemoryReactor()
    svc = AdminService(reactor, AdminSettings(listen="tcp:8740",
                                              token_file=str(tmp_path / "file" / "t")),
                       MethodRegistry(), CollectorRegistry())
    failures = []
    svc.startService().addErrback(failures.append)
    assert failures and failures[0].check(AdminListenError)
    assert "admin token file" in str(failures[0].value)
    assert reactor.tcpServers == [] and not svc.running
