"""Two-box bootstrap: ``appliancectl cluster init`` and ``appliancectl cluster join``.

On the first box::

    appliancectl cluster init --dir /etc/appliance --node-id a --address 10.9.0.1

makes, under ``--dir``:

* ``ca/ca.key`` -- the cluster CA's private key, alone in its own directory
  (mode 0700, file 0600, root only) so it can be moved offline after the join
  (it is only needed to sign the certificate of a node that joins later);
* ``keys/ca.pem`` (the CA certificate), ``keys/cluster.key`` (the heartbeat
  HMAC key), ``keys/a.pem`` / ``keys/a.key`` (this node's certificate and
  private key);
* ``appliance.toml`` -- this node's config (the ``etc/cluster/node-a.toml``
  shape, absolute paths, ``peers = []`` until the partner joins);
* ``ca/join-tokens.json`` -- pending join tokens, only their SHA-256.

It prints a one-time **join token** (once; valid ``--token-ttl`` seconds, 1 h
by default) carrying a 128-bit secret, the SHA-256 fingerprint of the CA
certificate and the join port, then waits for the partner's join on a TLS
listener (``--join-port``, 8743), which exists only while the command runs --
the running node never holds the CA key and serves no join method.

On the second box::

    appliancectl cluster join TOKEN 10.9.0.1 --dir /etc/appliance --node-id b --address 10.9.0.2

1. generates b's private key locally (it never leaves the box) and a CSR;
2. fetches the CA certificate from the join port and checks it against the
   fingerprint in the token (the token pins the cluster: a man in the middle
   has no certificate signed by that CA);
3. connects again, verifying the server with that CA only, and sends the
   token's secret, its node id, address and the CSR;
4. gets its certificate, the CA certificate, the HMAC key and the cluster's
   ports, and writes ``keys/`` and ``appliance.toml`` for b with a as peer.

The first box checks the secret (constant time), the expiry and that the token
was not used, marks it used on disk *before* answering (single use), signs the
CSR (CN and DNS name = node id, IP SAN = its address, serverAuth+clientAuth)
and adds b to its own ``peers``.  Then both configs pass ``twistd appliance
--check`` and the nodes form a cluster (heartbeats signed with the shared key,
the peer link over mutual TLS with the CA).

``appliancectl cluster invite --dir /etc/appliance`` issues a new token and
serves one more join (a replaced box), with the CA key back in place.

If the group ``appliance`` exists (the systemd unit's user), the node's key
and the HMAC key are made ``root:appliance`` mode 0640 so the service can
read them; the CA key stays root-only.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import grp
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

__all__ = ["local_command", "make_token", "parse_token", "init_cluster", "JoinServer",
           "join_cluster", "BootstrapError"]

TOKEN_PREFIX = "apj1."
DEFAULT_JOIN_PORT = 8743
DEFAULT_TTL_S = 3600
#: A node id is a DNS label (as appliance.config requires: the peer link checks it as
#: the TLS host name): lowercase letters, digits, inner '-', no '_', at most 32.
NODE_ID = re.compile(r"^(?!..--)[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
PEERS_MARKER = "# appliancectl cluster join adds the partner here"
MAX_REQUEST = 64 * 1024


class BootstrapError(Exception):
    """A one-line reason; exit status 1 (2 for usage problems)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------
# files
# ----------------------------------------------------------------------
def _service_gid() -> int | None:
    try:
        return grp.getgrnam("appliance").gr_gid
    except KeyError:
        return None


def _write(path: Path, data: bytes, mode: int = 0o644, service_readable: bool = False) -> Path:
    """Atomic write with the final mode from the start (a key is never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gid = _service_gid() if service_readable else None
    if service_readable and gid is not None and os.geteuid() == 0:
        mode = 0o640
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, mode & 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if gid is not None and os.geteuid() == 0:
            os.chown(tmp, 0, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fingerprint(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _check_node(node_id: str, address: str) -> None:
    if not NODE_ID.match(node_id or ""):
        raise BootstrapError(f"node id {node_id!r} is not a DNS label: lowercase letters, "
                             "digits and inner '-', no '_' (at most 32)", 2)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise BootstrapError(f"address {address!r} is not an IP address", 2) from None


def node_config(*, node_id: str, address: str, keys: Path, state_dir: str, admin_listen: str,
                peers: Sequence[tuple[str, str]], heartbeat_port: int, peer_link_port: int,
                heartbeat_interval_ms: int = 100, dead_after: int = 3) -> str:
    """The node's config, in the shape of ``etc/cluster/node-a.toml``."""
    if peers:
        peer_text = "[" + ", ".join(f'{{ id = "{i}", address = "{a}" }}' for i, a in peers) + "]"
    else:
        peer_text = "[]"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""# Node {node_id}, written by appliancectl cluster init/join on {now}.
# Add [[vip]] and [services.*] tables (etc/README.md); check with
#   twistd appliance --config THIS_FILE --check

[node]
id = "{node_id}"
state_dir = "{state_dir}"

[store]
backend = "memory"
fsync = "always"

[admin]
listen = "{admin_listen}"
token_file = "{state_dir}/admin.token"

[cluster]
peers = {peer_text}    {PEERS_MARKER}
bind_address = "{address}"
heartbeat_port = {heartbeat_port}
heartbeat_interval_ms = {heartbeat_interval_ms}
dead_after = {dead_after}
auth_key_file = "{keys}/cluster.key"
peer_link = "ssl:{peer_link_port}:interface={address}"
tls = {{ cert = "{keys}/{node_id}.pem", key = "{keys}/{node_id}.key", ca = "{keys}/ca.pem" }}
auto_partner_down_s = 0          # operator only; silence cannot tell death from a partition
"""


def add_peer_to_config(path: Path, peer_id: str, address: str) -> bool:
    """Put ``peer_id`` in the ``peers = [...]`` line written by init; False if that
    line was edited away (the operator adds the peer by hand then)."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(r"^peers = \[(.*)\]\s*" + re.escape(PEERS_MARKER) + r"$", re.M)
    m = pattern.search(text)
    if m is None:
        return False
    inner = m.group(1).strip()
    entry = f'{{ id = "{peer_id}", address = "{address}" }}'
    if f'id = "{peer_id}"' in inner:
        inner = re.sub(r'\{ id = "' + re.escape(peer_id) + r'", address = "[^"]*" \}', entry, inner)
    else:
        inner = f"{inner}, {entry}" if inner else entry
    text = text[:m.start()] + f"peers = [{inner}]    {PEERS_MARKER}" + text[m.end():]
    _write(path, text.encode(), 0o644)
    return True


# ----------------------------------------------------------------------
# tokens
# ----------------------------------------------------------------------
def make_token(secret: bytes, ca_fingerprint: str, expires: float, port: int) -> str:
    body = json.dumps({"s": base64.urlsafe_b64encode(secret).decode().rstrip("="),
                       "f": ca_fingerprint, "e": int(expires), "p": port},
                      separators=(",", ":")).encode()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")


def parse_token(token: str) -> dict[str, Any]:
    """``{"secret": bytes, "fingerprint": hex, "expires": int, "port": int}``."""
    token = token.strip()
    if not token.startswith(TOKEN_PREFIX):
        raise BootstrapError("not a join token (it starts with apj1.)", 2)
    try:
        raw = token[len(TOKEN_PREFIX):]
        body = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        secret_text = body["s"]
        out = {"secret": base64.urlsafe_b64decode(secret_text + "=" * (-len(secret_text) % 4)),
               "fingerprint": str(body["f"]), "expires": int(body["e"]), "port": int(body["p"])}
    except (ValueError, KeyError, TypeError):
        raise BootstrapError("the join token is damaged (copy it again)", 2) from None
    if len(out["secret"]) < 16 or not re.fullmatch(r"[0-9a-f]{64}", out["fingerprint"]):
        raise BootstrapError("the join token is damaged (copy it again)", 2)
    return out


def _secret_id(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


class TokenStore:
    """``ca/join-tokens.json``: SHA-256 of each secret, expiry, used."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise BootstrapError(f"{self.path} is damaged") from None

    def save(self, tokens: dict) -> None:
        _write(self.path, json.dumps(tokens, indent=1).encode(), 0o600)

    def issue(self, ttl_s: float, now: float | None = None) -> tuple[bytes, float]:
        now = time.time() if now is None else now
        secret = secrets.token_bytes(16)
        tokens = {k: v for k, v in self.load().items() if v.get("expires", 0) > now}
        expires = now + ttl_s
        tokens[_secret_id(secret)] = {"expires": expires, "used": None}
        self.save(tokens)
        return secret, expires

    def redeem(self, secret: bytes, node_id: str, now: float | None = None) -> None:
        """Mark the token used, or raise BootstrapError (unknown, expired, used)."""
        now = time.time() if now is None else now
        tokens = self.load()
        wanted = _secret_id(secret)
        entry = None
        for key, value in tokens.items():
            if hmac.compare_digest(key, wanted):
                entry = value
        if entry is None:
            raise BootstrapError("unknown join token")
        if entry.get("used"):
            raise BootstrapError(f"join token already used (by node {entry['used']})")
        if entry.get("expires", 0) <= now:
            raise BootstrapError("join token expired")
        entry["used"] = node_id
        entry["used_at"] = now
        self.save(tokens)          # on disk before the answer: single use


# ----------------------------------------------------------------------
# certificates
# ----------------------------------------------------------------------
def make_csr(node_id: str, address: str) -> tuple[bytes, bytes]:
    """``(csr_pem, key_pem)``: a fresh EC P-256 key and its request."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
           .add_extension(x509.SubjectAlternativeName(
               [x509.DNSName(node_id), x509.IPAddress(ipaddress.ip_address(address))]),
               critical=False)
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return csr.public_bytes(serialization.Encoding.PEM), key_pem


def sign_csr(ca_cert_pem: bytes, ca_key_pem: bytes, csr_pem: bytes, node_id: str,
             address: str, days: int = 825) -> bytes:
    """Sign a node's CSR: its public key, with the names the *server* decides
    (CN and DNS = node id, IP = its address), usable both ways (peer link)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from appliance.net.tls import sign_leaf
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise BootstrapError("the CSR is not a PEM certificate request") from None
    if not csr.is_signature_valid:
        raise BootstrapError("the CSR's signature is not valid")
    pub = csr.public_key()
    if not (isinstance(pub, ec.EllipticCurvePublicKey)
            or (isinstance(pub, rsa.RSAPublicKey) and pub.key_size >= 2048)):
        raise BootstrapError("the CSR's key must be EC or RSA >= 2048 bits")
    return sign_leaf(ca_cert_pem, ca_key_pem, pub, node_id, dns_names=[node_id], ips=[address],
                     days=days)


# ----------------------------------------------------------------------
# init
# ----------------------------------------------------------------------
def _layout(base: Path) -> dict[str, Path]:
    return {"ca_dir": base / "ca", "ca_key": base / "ca" / "ca.key",
            "tokens": base / "ca" / "join-tokens.json", "cluster_json": base / "cluster.json",
            "keys": base / "keys", "ca_cert": base / "keys" / "ca.pem",
            "hmac": base / "keys" / "cluster.key", "config": base / "appliance.toml"}


def init_cluster(base: Path, node_id: str, address: str, *, state_dir: str,
                 admin_listen: str, heartbeat_port: int = 8741, peer_link_port: int = 8742,
                 force: bool = False) -> dict[str, Any]:
    """Create the CA, HMAC key, this node's key+cert and config under ``base``."""
    from appliance.cluster.transport import new_cluster_key
    from appliance.net.tls import make_ca
    _check_node(node_id, address)
    p = _layout(base)
    if p["config"].exists() and not force:
        raise BootstrapError(f"{p['config']} exists: this box is already set up "
                             "(--force replaces everything, including the CA)")
    ca_cert, ca_key = make_ca("appliance cluster CA")
    os.makedirs(p["ca_dir"], mode=0o700, exist_ok=True)
    os.chmod(p["ca_dir"], 0o700)
    _write(p["ca_key"], ca_key, 0o600)
    _write(p["ca_cert"], ca_cert, 0o644)
    _write(p["hmac"], new_cluster_key().encode() + b"\n", 0o600, service_readable=True)
    csr, key = make_csr(node_id, address)
    cert = sign_csr(ca_cert, ca_key, csr, node_id, address)
    _write(p["keys"] / f"{node_id}.key", key, 0o600, service_readable=True)
    _write(p["keys"] / f"{node_id}.pem", cert, 0o644)
    cluster = {"node_id": node_id, "address": address, "heartbeat_port": heartbeat_port,
               "peer_link_port": peer_link_port, "heartbeat_interval_ms": 100, "dead_after": 3}
    _write(p["cluster_json"], json.dumps(cluster, indent=1).encode(), 0o644)
    _write(p["config"], node_config(node_id=node_id, address=address, keys=p["keys"].resolve(),
                                    state_dir=state_dir, admin_listen=admin_listen, peers=(),
                                    heartbeat_port=heartbeat_port,
                                    peer_link_port=peer_link_port).encode(), 0o644)
    return {"config": p["config"], "fingerprint": _fingerprint(ca_cert)}


def issue_token(base: Path, ttl_s: float, port: int) -> str:
    p = _layout(base)
    if not p["ca_key"].exists():
        raise BootstrapError(f"{p['ca_key']} is missing: put the CA key back (it signs the "
                             "joining node's certificate)")
    secret, expires = TokenStore(p["tokens"]).issue(ttl_s)
    return make_token(secret, _fingerprint(p["ca_cert"].read_bytes()), expires, port)


class JoinServer:
    """The one-shot join listener of ``cluster init`` / ``cluster invite``
    (blocking stdlib sockets: it runs in the CLI, not in the node)."""

    def __init__(self, base: Path, listen: tuple[str, int], *, log: TextIO | None = None):
        self.base = base
        self.p = _layout(base)
        meta = json.loads(self.p["cluster_json"].read_text())
        self.meta = meta
        self.node_id = meta["node_id"]
        self.log = log or sys.stderr
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(str(self.p["keys"] / f"{self.node_id}.pem"),
                                     str(self.p["keys"] / f"{self.node_id}.key"))
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.joined: list[dict] = []
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self.sock.close()

    def serve(self, until: float, joins: int = 1) -> list[dict]:
        """Answer requests until ``joins`` nodes joined or the deadline passed."""
        while len(self.joined) < joins and time.time() < until and not self._closed:
            try:
                self.sock.settimeout(max(0.1, min(1.0, until - time.time())))
                conn, peer = self.sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                if self._closed:
                    break
                raise
            try:
                conn.settimeout(10)
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self._handle(tls, peer)
            except (OSError, ssl.SSLError, ValueError) as e:
                print(f"join: {peer[0]}: {e}", file=self.log)
            finally:
                conn.close()
        return self.joined

    def _handle(self, tls: ssl.SSLSocket, peer) -> None:
        data = b""
        while not data.endswith(b"\n"):
            chunk = tls.recv(4096)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                raise ValueError("request too large")
        request = json.loads(data or b"{}")
        try:
            answer = self._answer(request, peer)
        except BootstrapError as e:
            print(f"join refused from {peer[0]}: {e}", file=self.log)
            answer = {"ok": False, "error": str(e)}
        tls.sendall(json.dumps(answer).encode() + b"\n")

    def _answer(self, request: dict, peer) -> dict:
        op = request.get("op")
        if op == "ca":       # public: the joiner checks it against the token's fingerprint
            return {"ok": True, "ca": self.p["ca_cert"].read_text()}
        if op != "join":
            raise BootstrapError(f"unknown request {op!r}")
        try:
            secret = base64.b64decode(str(request["secret"]))
            node_id, address, csr = str(request["node_id"]), str(request["address"]), request["csr"]
        except (KeyError, ValueError):
            raise BootstrapError("malformed join request") from None
        _check_node(node_id, address)
        if node_id == self.node_id:
            raise BootstrapError(f"node id {node_id!r} is this node's own id")
        if address == self.meta["address"]:
            raise BootstrapError(f"address {address} is this node's own address")
        ca_cert = self.p["ca_cert"].read_bytes()
        ca_key = self.p["ca_key"].read_bytes()
        cert = sign_csr(ca_cert, ca_key, str(csr).encode(), node_id, address)   # before redeeming
        TokenStore(self.p["tokens"]).redeem(secret, node_id)
        if not add_peer_to_config(self.p["config"], node_id, address):
            print(f"join: {self.p['config']} has no '{PEERS_MARKER}' line: add "
                  f'{{ id = "{node_id}", address = "{address}" }} to [cluster] peers by hand',
                  file=self.log)
        joined = {"node_id": node_id, "address": address, "from": peer[0]}
        self.joined.append(joined)
        print(f"node {node_id} ({address}) joined from {peer[0]}", file=self.log)
        return {"ok": True, "cert": cert.decode(), "ca": ca_cert.decode(),
                "cluster_key": self.p["hmac"].read_text().strip(),
                "peers": [{"id": self.node_id, "address": self.meta["address"]}],
                "heartbeat_port": self.meta["heartbeat_port"],
                "peer_link_port": self.meta["peer_link_port"],
                "heartbeat_interval_ms": self.meta.get("heartbeat_interval_ms", 100),
                "dead_after": self.meta.get("dead_after", 3)}


# ----------------------------------------------------------------------
# join
# ----------------------------------------------------------------------
def _exchange(host: str, port: int, context: ssl.SSLContext, request: dict,
              timeout: float) -> dict:
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host if context.check_hostname
                                     else None) as tls:
                tls.sendall(json.dumps(request).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
    except ssl.SSLCertVerificationError as e:
        raise BootstrapError(f"{host}:{port} is not the cluster the token names: "
                             f"{e.verify_message}") from None
    except (OSError, ssl.SSLError) as e:
        raise BootstrapError(f"cannot reach {host}:{port}: {e}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise BootstrapError(f"{host}:{port} did not answer a join request") from None
    if not answer.get("ok"):
        raise BootstrapError(f"{host}:{port} refused: {answer.get('error', 'no reason')}")
    return answer


def join_cluster(token: str, server: str, base: Path, node_id: str, address: str, *,
                 state_dir: str, admin_listen: str, timeout: float = 15.0,
                 force: bool = False) -> dict[str, Any]:
    t = parse_token(token)
    _check_node(node_id, address)
    if t["expires"] <= time.time():
        raise BootstrapError("the join token expired: run `appliancectl cluster invite` on the "
                             "first box for a new one")
    host, port = server, t["port"]
    m = re.fullmatch(r"\[(.+)\]:(\d+)|([^:]+):(\d+)", server)
    if m:
        host, port = (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), int(m.group(4)))
    p = _layout(base)
    if p["config"].exists() and not force:
        raise BootstrapError(f"{p['config']} exists: this box is already set up (--force)")
    # 1. the CA certificate, over any channel: it must match the token's fingerprint
    insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    ca_pem = _exchange(host, port, insecure, {"op": "ca"}, timeout)["ca"].encode()
    if not hmac.compare_digest(_fingerprint(ca_pem), t["fingerprint"]):
        raise BootstrapError(f"{host}:{port} offered a CA whose fingerprint is not the token's: "
                             "not the cluster the token was made for")
    # 2. the join itself, the server verified by that CA alone (any certificate
    #    it signed is a cluster node; the address may be a name or a NAT'd IP)
    pinned = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pinned.check_hostname = False
    pinned.verify_mode = ssl.CERT_REQUIRED
    pinned.load_verify_locations(cadata=ca_pem.decode())
    csr, key = make_csr(node_id, address)       # the private key never leaves this box
    answer = _exchange(host, port, pinned, {
        "op": "join", "secret": base64.b64encode(t["secret"]).decode(), "node_id": node_id,
        "address": address, "csr": csr.decode()}, timeout)
    cert = answer["cert"].encode()
    if _fingerprint(answer["ca"].encode()) != t["fingerprint"]:
        raise BootstrapError("the answer's CA is not the pinned one")
    _verify_issued(cert, ca_pem, key)
    _write(p["keys"] / f"{node_id}.key", key, 0o600, service_readable=True)
    _write(p["keys"] / f"{node_id}.pem", cert, 0o644)
    _write(p["ca_cert"], ca_pem, 0o644)
    _write(p["hmac"], answer["cluster_key"].encode() + b"\n", 0o600, service_readable=True)
    peers = [(x["id"], x["address"]) for x in answer["peers"]]
    meta = {"node_id": node_id, "address": address,
            "heartbeat_port": answer["heartbeat_port"],
            "peer_link_port": answer["peer_link_port"],
            "heartbeat_interval_ms": answer.get("heartbeat_interval_ms", 100),
            "dead_after": answer.get("dead_after", 3)}
    _write(p["cluster_json"], json.dumps(meta, indent=1).encode(), 0o644)
    _write(p["config"], node_config(
        node_id=node_id, address=address, keys=p["keys"].resolve(), state_dir=state_dir,
        admin_listen=admin_listen, peers=peers, heartbeat_port=meta["heartbeat_port"],
        peer_link_port=meta["peer_link_port"],
        heartbeat_interval_ms=meta["heartbeat_interval_ms"],
        dead_after=meta["dead_after"]).encode(), 0o644)
    return {"config": p["config"], "peers": peers}


def _verify_issued(cert_pem: bytes, ca_pem: bytes, key_pem: bytes) -> None:
    """The certificate is for our key and signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise BootstrapError("the issued certificate is not for this box's key")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as e:
        raise BootstrapError(f"the issued certificate is not signed by the cluster CA: {e}")


# ----------------------------------------------------------------------
# command line (dispatched from appliancectl)
# ----------------------------------------------------------------------
def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="action", required=True)

    def common(p, node: bool = True):
        p.add_argument("--dir", type=Path, default=Path("/etc/appliance"),
                       help="where the config and keys go (default /etc/appliance)")
        if node:
            p.add_argument("--node-id", required=True, help="this node's id, e.g. a")
            p.add_argument("--address", required=True,
                           help="this node's cluster address (heartbeats, peer link)")
            p.add_argument("--state-dir", default="/var/lib/appliance")
            p.add_argument("--admin-listen", default="tcp:8740:interface=127.0.0.1")
            p.add_argument("--force", action="store_true",
                           help="replace an existing setup")

    def serving(p):
        p.add_argument("--join-port", type=int, default=DEFAULT_JOIN_PORT,
                       help=f"TLS port the partner joins on (default {DEFAULT_JOIN_PORT})")
        p.add_argument("--listen", default=None,
                       help="address to listen on for the join (default: --address, or all)")
        p.add_argument("--token-ttl", type=float, default=DEFAULT_TTL_S,
                       help="seconds the token is valid (default 3600)")
        p.add_argument("--no-wait", action="store_true",
                       help="print the token and exit (serve later with cluster invite)")
        p.add_argument("--token-file", type=Path, default=None,
                       help="also write the token to this file (mode 0600)")

    p = sub.add_parser("init", help="create the cluster on the first box and wait for the join")
    common(p)
    serving(p)
    p.add_argument("--heartbeat-port", type=int, default=8741)
    p.add_argument("--peer-link-port", type=int, default=8742)
    p = sub.add_parser("invite", help="issue a new join token and serve one join")
    common(p, node=False)
    serving(p)
    p = sub.add_parser("join", help="join the cluster of the first box")
    p.add_argument("token")
    p.add_argument("server", metavar="ADDRESS", help="the first box: HOST or HOST:PORT")
    common(p)
    p.add_argument("--timeout", type=float, default=15.0)
    return parser


def _serve(args, stdout: TextIO, stderr: TextIO, listen_default: str) -> int:
    base = args.dir
    host = args.listen or listen_default
    server = JoinServer(base, (host, args.join_port), log=stderr)
    try:
        token = issue_token(base, args.token_ttl, server.port)
        if args.token_file is not None:
            _write(args.token_file, token.encode() + b"\n", 0o600)
        stdout.write(f"join token (valid {args.token_ttl:g} s, single use; shown once):\n"
                     f"{token}\n")
        stdout.flush()
        if args.no_wait:
            return 0
        stdout.write(f"waiting for the partner on {host}:{server.port} (Ctrl-C to stop)...\n")
        stdout.flush()
        joined = server.serve(time.time() + args.token_ttl)
    finally:
        server.close()
    if not joined:
        stderr.write("appliancectl: no node joined before the token expired\n")
        return 1
    for j in joined:
        stdout.write(f"node {j['node_id']} ({j['address']}) joined; "
                     f"{_layout(base)['config']} now lists it as peer\n")
    stdout.write(f"move {_layout(base)['ca_dir']} offline now if you like "
                 "(only `cluster invite` needs it)\n")
    return 0


def cluster_main(argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> int:
    args = _parser("appliancectl cluster").parse_args(list(argv))
    try:
        if args.action == "init":
            out = init_cluster(args.dir, args.node_id, args.address, state_dir=args.state_dir,
                               admin_listen=args.admin_listen,
                               heartbeat_port=args.heartbeat_port,
                               peer_link_port=args.peer_link_port, force=args.force)
            stdout.write(f"wrote {out['config']} and keys under {args.dir} "
                         f"(CA fingerprint sha256:{out['fingerprint']})\n")
            return _serve(args, stdout, stderr, args.address)
        if args.action == "invite":
            meta = json.loads(_layout(args.dir)["cluster_json"].read_text())
            return _serve(args, stdout, stderr, meta["address"])
        out = join_cluster(args.token, args.server, args.dir, args.node_id, args.address,
                           state_dir=args.state_dir, admin_listen=args.admin_listen,
                           timeout=args.timeout, force=args.force)
        stdout.write(f"joined: wrote {out['config']} (peers: "
                     + ", ".join(f"{i} {a}" for i, a in out["peers"]) + ")\n")
        return 0
    except BootstrapError as e:
        stderr.write(f"appliancectl: cluster {args.action}: {e}\n")
        return e.exit_code
    except OSError as e:
        stderr.write(f"appliancectl: cluster {args.action}: {e}\n")
        return 1


def local_command(argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> int | None:
    """appliancectl commands that run on the box itself, not over JSON-RPC:
    ``cluster init|join|invite``, ``backup``, ``restore``.  None for any other
    command (the JSON-RPC client handles it)."""
    args = list(argv)
    # global options may come first: skip them (with their values)
    with_value = {"--config", "--url", "--token-file", "--timeout", "--ca", "--cert", "--key"}
    i = 0
    config = None
    while i < len(args) and args[i].startswith("-"):
        opt, eq, value = args[i].partition("=")
        if opt == "--config":
            config = value if eq else (args[i + 1] if i + 1 < len(args) else None)
        i += 1 if eq or opt not in with_value else 2
    rest = args[i:]
    if len(rest) >= 2 and rest[0] == "cluster" and rest[1] in ("init", "join", "invite"):
        return cluster_main(rest[1:], stdout, stderr)
    if rest and rest[0] in ("backup", "restore"):
        from appliance.backup import backup_main
        return backup_main(rest, stdout, stderr, config=config)
    return None
