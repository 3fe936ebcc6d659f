"""``appliance-keys``: create the secrets of a new cluster.

    appliance-keys DIR --node a=10.9.0.1 --node b=10.9.0.2 [--force]

Writes into DIR: ``cluster.key`` (the heartbeat HMAC key), ``ca.pem`` /
``ca.key`` (the cluster CA), and ``<id>.pem`` / ``<id>.key`` for each node
(certificate with the node id as common name and DNS name, its address as
IP SAN, usable as TLS server and client for the peer link).  Private files
are created with mode 0600.  Existing files are kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from appliance.cluster.transport import new_cluster_key


def _write(path: Path, data: bytes, private: bool, force: bool) -> str:
    if path.exists() and not force:
        return f"kept     {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return f"created  {path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance-keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="where to write the files")
    parser.add_argument("--node", action="append", default=[], metavar="ID=ADDRESS",
                        help="a cluster node and its peer-link address (repeat)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    nodes = []
    for item in args.node:
        node_id, _, address = item.partition("=")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            print(f"appliance-keys: --node {item}: expected ID=IP-ADDRESS", file=sys.stderr)
            return 2
        nodes.append((node_id, ip))
    from appliance.net.tls import make_ca, make_cert

    out = [_write(args.dir / "cluster.key", new_cluster_key().encode() + b"\n", True, args.force)]
    ca_cert_path, ca_key_path = args.dir / "ca.pem", args.dir / "ca.key"
    if ca_cert_path.exists() and ca_key_path.exists() and not args.force:
        ca_cert, ca_key = ca_cert_path.read_bytes(), ca_key_path.read_bytes()
        out.append(f"kept     {ca_cert_path}")
    else:
        ca_cert, ca_key = make_ca("appliance cluster CA")
        out.append(_write(ca_cert_path, ca_cert, False, True))
        out.append(_write(ca_key_path, ca_key, True, True))
    for node_id, ip in nodes:
        cert, key = make_cert(ca_cert, ca_key, node_id, dns_names=(node_id,), ips=(str(ip),))
        out.append(_write(args.dir / f"{node_id}.pem", cert, False, args.force))
        out.append(_write(args.dir / f"{node_id}.key", key, True, args.force))
    print("\n".join(out))
    print(f"\nIn each node's config:\n  auth_key_file = \"{args.dir / 'cluster.key'}\"\n"
          f"  tls = {{ cert = \"{args.dir}/<id>.pem\", key = \"{args.dir}/<id>.key\", "
          f"ca = \"{ca_cert_path}\" }}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
