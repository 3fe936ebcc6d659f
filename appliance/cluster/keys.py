"""``appliance-keys``: create the secrets of a new cluster.

    appliance-keys DIR --node a=10.9.0.1 --node b=10.9.0.2 [--force] [--force-new-ca]

Writes into DIR: ``cluster.key`` (the heartbeat HMAC key), ``ca.pem`` /
``ca.key`` (the cluster CA), and ``<id>.pem`` / ``<id>.key`` for each node
(certificate with the node id as common name and DNS name, its address as
IP SAN, usable as TLS server and client for the peer link).  Private files
are created with mode 0600, written to a unique temporary name, fsynced and
renamed.  Existing files are kept unless ``--force``.

Per node, ``DIR/<id>/`` is the bundle to copy to that node and nowhere else:
``cluster.key``, ``ca.pem``, ``<id>.pem``, ``<id>.key`` -- no CA key, no other
node's private key.  Keep ``DIR/ca.key`` offline (it is needed only to add
or renew a node).  With ``ca.pem`` present but ``ca.key`` missing (moved
offline) the tool refuses instead of making a new CA (every existing node
certificate would stop verifying): bring the CA key back, or pass
``--force-new-ca`` to start a new PKI (then every node needs its new bundle).
Node ids must be DNS labels (the peer link checks them as TLS host names):
lowercase letters, digits and inner ``-``; no ``_``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from appliance.cluster.transport import load_key, new_cluster_key

CERT_WARN_DAYS = 30          # cluster.status warns when a certificate expires sooner


def previous_keys(cfg) -> tuple[bytes, ...]:
    """The keys accepted besides the current one during a rotation
    (``previous_auth_key_file``; missing or unreadable: none, logged by the
    caller)."""
    path = getattr(cfg, "previous_auth_key_file", None) if cfg is not None else None
    return (load_key(path),) if path else ()


def cert_expiry(path: str, now=None) -> dict:
    """``{"file", "subject", "not_after", "days_left"}`` of a PEM certificate
    (or ``{"file", "error"}``)."""
    import datetime

    from cryptography import x509
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        return {"file": str(path), "error": f"{type(e).__name__}: {e}"}
    not_after = cert.not_valid_after_utc
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return {"file": str(path), "subject": cert.subject.rfc4514_string(),
            "not_after": not_after.isoformat(),
            "days_left": round((not_after - now).total_seconds() / 86400, 1)}


def _write(path: Path, data: bytes, private: bool, force: bool) -> str:
    if path.exists() and not force:
        return f"kept     {path}"
    import tempfile
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return f"created  {path}"


def valid_node_id(node_id: str) -> bool:
    """A DNS label (the peer link verifies the peer's id as a TLS host name)."""
    from appliance.config import _DNS_LABEL
    return bool(_DNS_LABEL.match(node_id))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance-keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="where to write the files")
    parser.add_argument("--node", action="append", default=[], metavar="ID=ADDRESS",
                        help="a cluster node and its peer-link address (repeat)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing files (not the CA: see --force-new-ca)")
    parser.add_argument("--force-new-ca", action="store_true",
                        help="make a new CA even though ca.pem exists (a new PKI: every node "
                             "needs its new bundle)")
    args = parser.parse_args(argv)
    nodes = []
    for item in args.node:
        node_id, _, address = item.partition("=")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            print(f"appliance-keys: --node {item}: expected ID=IP-ADDRESS", file=sys.stderr)
            return 2
        if not valid_node_id(node_id):
            print(f"appliance-keys: --node {item}: {node_id!r} is not a node id (a DNS label: "
                  "lowercase letters, digits, inner '-'; no '_': the peer link checks it as a "
                  "TLS host name)", file=sys.stderr)
            return 2
        nodes.append((node_id, ip))
    from appliance.net.tls import make_ca, make_cert

    ca_cert_path, ca_key_path = args.dir / "ca.pem", args.dir / "ca.key"
    if ca_cert_path.exists() and not ca_key_path.exists() and not args.force_new_ca:
        print(f"appliance-keys: {ca_cert_path} exists but {ca_key_path} does not (moved "
              "offline?): bring the CA key back to add or renew nodes, or pass --force-new-ca "
              "to start a new PKI (every node then needs its new bundle)", file=sys.stderr)
        return 2
    out = [_write(args.dir / "cluster.key", new_cluster_key().encode() + b"\n", True, args.force)]
    if ca_cert_path.exists() and ca_key_path.exists() and not args.force_new_ca:
        ca_cert, ca_key = ca_cert_path.read_bytes(), ca_key_path.read_bytes()
        out.append(f"kept     {ca_cert_path}")
    else:
        ca_cert, ca_key = make_ca("appliance cluster CA")
        out.append(_write(ca_cert_path, ca_cert, False, True))
        out.append(_write(ca_key_path, ca_key, True, True))
    cluster_key = (args.dir / "cluster.key").read_bytes()
    for node_id, ip in nodes:
        cert_path, key_path = args.dir / f"{node_id}.pem", args.dir / f"{node_id}.key"
        if cert_path.exists() and key_path.exists() and not (args.force or args.force_new_ca):
            cert, key = cert_path.read_bytes(), key_path.read_bytes()
            out += [f"kept     {cert_path}", f"kept     {key_path}"]
        else:
            cert, key = make_cert(ca_cert, ca_key, node_id, dns_names=(node_id,), ips=(str(ip),))
            out.append(_write(cert_path, cert, False, True))
            out.append(_write(key_path, key, True, True))
        bundle = args.dir / node_id
        force = args.force or args.force_new_ca
        out.append(_write(bundle / "cluster.key", cluster_key, True, force))
        out.append(_write(bundle / "ca.pem", ca_cert, False, force))
        out.append(_write(bundle / f"{node_id}.pem", cert, False, force))
        out.append(_write(bundle / f"{node_id}.key", key, True, force))
    print("\n".join(out))
    print(f"\nCopy {args.dir}/<id>/ to node <id> only (never ca.key: keep {ca_key_path} "
          "offline).  In each node's config, with the bundle at /etc/appliance/keys:\n"
          "  auth_key_file = \"/etc/appliance/keys/cluster.key\"\n"
          "  tls = { cert = \"/etc/appliance/keys/<id>.pem\", key = \"/etc/appliance/keys/"
          "<id>.key\", ca = \"/etc/appliance/keys/ca.pem\" }")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
