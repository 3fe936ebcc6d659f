"""Certificates and TLS contexts for the admin API and the cluster peer link.

Keys and certificates are made with ``cryptography`` (pyOpenSSL no longer
generates them): EC P-256, SubjectAltName with DNS names and IP addresses,
extended key usage serverAuth + clientAuth (one certificate per node serves
both ends of a mutual-TLS link).  The contexts are Twisted's
(``CertificateOptions`` / ``optionsForClientTLS``) so they plug straight into
``SSL4ServerEndpoint`` / ``SSL4ClientEndpoint``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["make_ca", "make_cert", "write_pem", "split_pem_certs", "server_options",
           "client_options"]

_BACKDATE = datetime.timedelta(minutes=5)   # tolerate small clock skew between boxes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str, *, days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed CA: ``(cert_pem, key_pem)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_cert(ca_cert_pem: bytes, ca_key_pem: bytes, common_name: str, *,
              dns_names: Iterable[str] = (), ips: Iterable[str] = (),
              days: int = 825) -> tuple[bytes, bytes]:
    """A leaf certificate signed by the CA: ``(cert_pem, key_pem)``.

    ``common_name`` is also put in the SAN as a DNS name when it is not an IP
    address and ``dns_names`` is empty, so name checks work either way.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    dns = list(dns_names)
    addresses = [ipaddress.ip_address(str(ip)) for ip in ips]
    if not dns:
        try:
            addresses.append(ipaddress.ip_address(common_name))
        except ValueError:
            dns.append(common_name)
    cert_pem = sign_leaf(ca_cert_pem, ca_key_pem, key.public_key(), common_name,
                         dns_names=dns, ips=addresses, days=days)
    return cert_pem, _key_pem(key)


def sign_leaf(ca_cert_pem: bytes, ca_key_pem: bytes, public_key, common_name: str, *,
              dns_names: Iterable[str] = (), ips: Iterable = (), days: int = 825) -> bytes:
    """A leaf certificate for ``public_key`` signed by the CA (PEM), usable as
    server and client (the peer link dials both ways); SANs as given."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(dns_names)]
    sans += [x509.IPAddress(ipaddress.ip_address(str(a))) for a in dict.fromkeys(ips)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def write_pem(path: str | Path, data: bytes, private: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; mode 0600 if ``private`` else 0644.

    The temporary file is created with the final mode, so a key is never
    readable by others, not even briefly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)   # mode 0600
    try:
        if not private:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def split_pem_certs(pem: bytes) -> list[bytes]:
    """Every certificate in a PEM bundle, each as its own PEM (ValueError if none)."""
    certs = x509.load_pem_x509_certificates(pem)
    return [c.public_bytes(serialization.Encoding.PEM) for c in certs]


def _private_certificate(cert_pem: bytes, key_pem: bytes):
    """``(PrivateCertificate, [intermediate Certificate...])`` from PEM data."""
    from twisted.internet import ssl
    certs = split_pem_certs(cert_pem)
    leaf = ssl.PrivateCertificate.loadPEM(certs[0] + b"\n" + key_pem)
    chain = [ssl.Certificate.loadPEM(c) for c in certs[1:]]
    return leaf, chain


def server_options(cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None = None):
    """Server-side TLS options (TLS >= 1.2).

    With ``ca_pem`` (one or more CA certificates), clients must present a
    certificate signed by one of them; without, no client certificate is asked for.
    """
    from twisted.internet import ssl
    leaf, chain = _private_certificate(cert_pem, key_pem)
    kwargs = dict(privateKey=leaf.privateKey.original, certificate=leaf.original,
                  extraCertChain=[c.original for c in chain],
                  raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    if ca_pem is not None:
        authorities = [ssl.Certificate.loadPEM(c) for c in split_pem_certs(ca_pem)]
        kwargs["trustRoot"] = ssl.trustRootFromCertificates(authorities)
        # With a trustRoot, Twisted requires and verifies the peer certificate.
    return ssl.CertificateOptions(**kwargs)


def client_options(hostname: str, ca_pem: bytes, cert_pem: bytes | None = None,
                   key_pem: bytes | None = None):
    """Client-side TLS options verifying the server against ``ca_pem`` and ``hostname``.

    ``hostname`` may be a DNS name or an IP address (checked against the SAN).
    With ``cert_pem``/``key_pem`` the client presents that certificate.
    """
    from twisted.internet import ssl
    authorities = [ssl.Certificate.loadPEM(c) for c in split_pem_certs(ca_pem)]
    client_cert = None
    if cert_pem is not None:
        if key_pem is None:
            raise ValueError("client_options: cert_pem given without key_pem")
        client_cert, _chain = _private_certificate(cert_pem, key_pem)
    return ssl.optionsForClientTLS(hostname, trustRoot=ssl.trustRootFromCertificates(authorities),
                                   clientCertificate=client_cert)
