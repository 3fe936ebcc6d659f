"""A real BIND 9 ``named`` on loopback for tests and benchmarks.

``NamedServer`` writes its own ``named.conf`` in a temporary directory: one
TSIG key (``tsig-keygen``), a forward zone and a reverse zone that accept
updates signed with that key, no recursion, listening on 127.0.0.1 at a free
port (UDP and TCP).  ``stop()`` ends it (SIGTERM, then SIGKILL), ``kill()``
sends SIGKILL, ``restart()`` brings it back on the same port with the same
zones (the journal keeps accepted updates).  Only the process started here
is ever signalled, by its own pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.server_process import DirServerProcess

APT_PACKAGES = ("bind9", "bind9-utils", "bind9-dnsutils")


def free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (best effort)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def find_named() -> str | None:
    """The ``named`` binary, or None (it lives in /usr/sbin)."""
    return shutil.which("named") or shutil.which("named", path="/usr/sbin:/sbin")


def find_tsig_keygen() -> str | None:
    return shutil.which("tsig-keygen") or shutil.which("tsig-keygen", path="/usr/sbin:/sbin")


def install_bind(timeout: float = 900) -> bool:
    """apt-get install BIND (root only); True when ``named`` is available afterwards."""
    if find_named() and find_tsig_keygen():
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                    "-o", "DPkg::Lock::Timeout=600", *APT_PACKAGES],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, timeout=timeout)
    return bool(find_named() and find_tsig_keygen())


_SOA = """$TTL 60
@   IN SOA ns1.{primary} hostmaster.{primary} ( 1 3600 600 86400 0 )
    IN NS  ns1.{primary}
"""



class NamedServer(DirServerProcess):
    """One ``named -f -g`` process serving ``zone`` and ``reverse_zone`` on 127.0.0.1."""

    restart_pause = 0.2

    def __init__(self, *, zone: str = "example.test.", reverse_zone: str = "0.9.10.in-addr.arpa.",
                 key_name: str = "appliance-key", port: int | None = None,
                 workdir: str | Path | None = None, extra_zones: tuple[str, ...] = (),
                 workers: int | None = 1, zone_options: str = "",
                 views: tuple[str, ...] = ()):
        self.named = find_named() or "named"
        self.workers = workers          # named -n; None: named's default (one per CPU)
        #: extra statements for the forward zone, e.g. "dnssec-policy default; inline-signing yes;"
        self.zone_options = zone_options
        #: BIND views chosen by TSIG key: view name -> its key file (the key is named
        #: like the view); the last view also takes unsigned queries.  ``key_file``
        #: is then the first view's.
        self.views = tuple(views)
        self.zone = zone if zone.endswith(".") else zone + "."
        self.reverse_zone = reverse_zone if reverse_zone.endswith(".") else reverse_zone + "."
        self.zones = (self.zone, self.reverse_zone, *extra_zones)
        self.key_name = key_name
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="named-test-"))
        self.key_file = self.dir / f"{key_name}.key"
        self.view_key_files = {v: self.dir / f"{v}.key" for v in self.views}
        self.conf = self.dir / "named.conf"
        self.log_path = self.dir / "named.log"
        self.proc: subprocess.Popen | None = None
        self._logfh = None
        self._written = False

    # -- setup -----------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def key_secret(self) -> str:
        from services.dns.tsigkey import parse_key_file
        return parse_key_file(self.key_file.read_text())[0].secret

    def _write(self) -> None:
        if self._written:
            return
        keygen = find_tsig_keygen() or "tsig-keygen"
        if self.views:
            self._write_views(keygen)
            return
        key = subprocess.run([keygen, "-a", "hmac-sha256", self.key_name], check=True,
                             capture_output=True, text=True).stdout
        self.key_file.write_text(key)
        zones = []
        for zone in self.zones:
            path = self.dir / f"db.{zone.rstrip('.')}"
            text = _SOA.format(primary=self.zone)
            if zone == self.zone:
                text += "ns1 IN A 127.0.0.1\n"
            path.write_text(text)
            more = f" {self.zone_options}" if zone == self.zone and self.zone_options else ""
            zones.append(f'zone "{zone}" {{ type primary; file "{path}"; '
                         f'allow-update {{ key "{self.key_name}"; }};{more} }};')
        self.conf.write_text(f"""
include "{self.key_file}";
options {{
    directory "{self.dir}";
    pid-file none;
    session-keyfile none;
    listen-on port {self.port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    allow-query {{ 127.0.0.0/8; }};
    notify no;
    dnssec-validation no;
    max-journal-size unlimited;
}};
controls {{ }};
{chr(10).join(zones)}
""")
        self._written = True

    def _write_views(self, keygen: str) -> None:
        includes, blocks = [], []
        for i, view in enumerate(self.views):
            key = subprocess.run([keygen, "-a", "hmac-sha256", view], check=True,
                                 capture_output=True, text=True).stdout
            self.view_key_files[view].write_text(key)
            includes.append(f'include "{self.view_key_files[view]}";')
            zones = []
            for zone in self.zones:
                path = self.dir / f"db.{zone.rstrip('.')}.{view}"
                text = _SOA.format(primary=self.zone)
                if zone == self.zone:
                    text += "ns1 IN A 127.0.0.1\n"
                path.write_text(text)
                zones.append(f'  zone "{zone}" {{ type primary; file "{path}"; '
                             f'allow-update {{ key "{view}"; }}; }};')
            clients = f'key "{view}";' + (" any;" if i == len(self.views) - 1 else "")
            others = "".join(f' !key "{v}";' for v in self.views if v != view)
            blocks.append(f'view "{view}" {{\n  match-clients {{{others} {clients} }};\n'
                          + "\n".join(zones) + "\n};")
        self.key_file = self.view_key_files[self.views[0]]
        self.conf.write_text("\n".join(includes) + f"""
options {{
    directory "{self.dir}";
    pid-file none;
    session-keyfile none;
    listen-on port {self.port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    allow-query {{ 127.0.0.0/8; }};
    notify no;
    dnssec-validation no;
    max-journal-size unlimited;
}};
controls {{ }};
""" + "\n".join(blocks) + "\n")
        self._written = True

    # -- life cycle ------------------------------------------------------
    def start(self, timeout: float = 15.0) -> "NamedServer":
        if self.alive:
            return self
        self._write()
        workers = ["-n", str(self.workers)] if self.workers else []
        return self._launch([self.named, "-f", "-g", "-4", *workers, "-c", str(self.conf)],
                            timeout)

    def wait_ready(self, timeout: float = 15.0) -> None:
        import dns.message
        import dns.query
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"named exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                ok = True
                for zone in self.zones:
                    q = dns.message.make_query(zone, "SOA")
                    r = dns.query.udp(q, "127.0.0.1", timeout=0.2, port=self.port)
                    ok = ok and bool(r.answer)
                if ok:
                    return
            except Exception:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"named on port {self.port} not ready within {timeout}s: "
                           f"{self.log_tail()}")

