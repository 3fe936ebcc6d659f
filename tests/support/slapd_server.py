"""A real OpenLDAP ``slapd`` on loopback for tests.

``SlapdServer`` builds its own cn=config directory in a temporary directory
(``slapadd -n 0``: back_mdb, the core/cosine/nis/inetorgperson schemas, one
mdb database for ``dc=example,dc=net`` whose rootdn is
``cn=admin,dc=example,dc=net`` / ``secret``), loads the base entries
``dc=example,dc=net`` and ``ou=hosts,dc=example,dc=net`` offline (``slapadd``),
and runs ``slapd -d stats -h ldap://127.0.0.1:PORT/ -F DIR`` in the foreground
(any ``-d`` keeps slapd from detaching) with its output in ``slapd.log``.

``stop()`` ends it (SIGTERM, then SIGKILL), ``kill()`` sends SIGKILL (a crash),
``start()`` / ``restart()`` bring it back on the same port with the same data
directory, so entries persist.  Only the process started here is ever
signalled, by its own pid.

Hosts are stored as ``cn=<name>,ou=hosts,dc=example,dc=net`` with the
objectClasses ``device`` (structural, core), ``ieee802Device`` (``macAddress``)
and ``ipHost`` (``ipHostNumber``), both from the nis schema (RFC 2307).

Install (Debian 12, OpenLDAP 2.5.13), see ``install_slapd()``::

    echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slapd ldap-utils
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.node_process import free_port
from tests.support.server_process import DirServerProcess

APT_PACKAGES = ("slapd", "ldap-utils")
DEBCONF_PRESEED = "slapd slapd/no_configuration boolean true\n"
# The Debian init script does not start the system slapd while this exists.
SYSTEM_SENTINEL = Path("/etc/ldap/noslapd")
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")
SCHEMAS = ("core", "cosine", "nis", "inetorgperson")   # nis needs cosine

_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


class SlapdError(RuntimeError):
    """An LDAP operation against the test slapd failed."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def find_slapd() -> str | None:
    """The ``slapd`` binary, or None (it lives in /usr/sbin)."""
    return _which("slapd")


def find_slapadd() -> str | None:
    return _which("slapadd")


def find_ldapmodify() -> str | None:
    return _which("ldapmodify")


def _installed() -> bool:
    return bool(find_slapd() and find_slapadd() and find_ldapmodify()
                and (SCHEMA_DIR / "nis.ldif").exists())


def install_slapd(timeout: float = 900) -> bool:
    """apt-get install slapd + ldap-utils (root only), preseeded so the package
    creates no configuration and starts no system slapd.  True when slapd,
    slapadd, ldapmodify and the schema LDIFs are available afterwards."""
    if _installed():
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    selections = _which("debconf-set-selections")
    if selections:
        subprocess.run([selections], input=DEBCONF_PRESEED.encode(), timeout=60, **quiet)
    try:   # belt and braces: the init script refuses to start while this exists
        SYSTEM_SENTINEL.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_SENTINEL.touch()
    except OSError:
        pass
    install = ["apt-get", "install", "-y", "--no-install-recommends",
               "-o", "DPkg::Lock::Timeout=600", *APT_PACKAGES]
    result = subprocess.run(install, timeout=timeout, **quiet)
    if result.returncode != 0:   # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-o", "DPkg::Lock::Timeout=600"],
                       timeout=timeout, **quiet)
        subprocess.run(install, timeout=timeout, **quiet)
    return _installed()


_CONFIG_LDIF = """\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {dir}/slapd.pid
olcArgsFile: {dir}/slapd.args

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {module_dir}
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{includes}

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {base_dn}
olcRootDN: {admin_dn}
olcRootPW: {admin_password}
olcDbDirectory: {data_dir}
olcDbMaxSize: 67108864
olcDbIndex: objectClass eq
olcDbIndex: cn eq
olcAccess: {{0}}to * by * read
"""

_BASE_LDIF = """\
dn: {base_dn}
objectClass: dcObject
objectClass: organization
dc: example
o: example

dn: {hosts_dn}
objectClass: organizationalUnit
ou: hosts
"""


class SlapdServer(DirServerProcess):
    """One foreground ``slapd`` serving ``dc=example,dc=net`` on 127.0.0.1:``port``."""

    restart_pause = 0.1

    base_dn = "dc=example,dc=net"
    hosts_dn = "ou=hosts,dc=example,dc=net"
    admin_dn = "cn=admin,dc=example,dc=net"
    admin_password = "secret"

    def __init__(self, port: int | None = None, workdir: Path | None = None, *,
                 loglevel: str = "stats"):
        self.slapd = find_slapd() or "slapd"
        self.port = port or free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.loglevel = loglevel
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="slapd-test-"))
        self.config_dir = self.dir / "slapd.d"
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "slapd.log"
        self.proc: subprocess.Popen | None = None
        self._logfh = None

    # -- setup -----------------------------------------------------------
    def _slapadd(self, args: list[str], ldif: Path) -> None:
        result = subprocess.run([find_slapadd() or "slapadd", "-q", *args,
                                 "-F", str(self.config_dir), "-l", str(ldif)],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise SlapdError(f"slapadd {' '.join(args)} -l {ldif.name} failed "
                             f"({result.returncode}): {result.stderr.strip()}")

    def _build(self) -> None:
        """cn=config and the base entries, once (an existing directory is reused)."""
        if (self.config_dir / "cn=config.ldif").exists():
            return
        shutil.rmtree(self.config_dir, ignore_errors=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.config_dir.mkdir(parents=True)
        self.data_dir.mkdir(parents=True)
        includes = "\n".join(f"include: file://{SCHEMA_DIR}/{name}.ldif" for name in SCHEMAS)
        config = self.dir / "config.ldif"
        config.write_text(_CONFIG_LDIF.format(
            dir=self.dir, module_dir=MODULE_DIR, includes=includes, base_dn=self.base_dn,
            admin_dn=self.admin_dn, admin_password=self.admin_password, data_dir=self.data_dir))
        base = self.dir / "base.ldif"
        base.write_text(_BASE_LDIF.format(base_dn=self.base_dn, hosts_dn=self.hosts_dn))
        try:
            self._slapadd(["-n", "0"], config)
            self._slapadd(["-b", self.base_dn], base)
        except BaseException:
            shutil.rmtree(self.config_dir, ignore_errors=True)   # retry from scratch
            raise

    # -- life cycle ------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "SlapdServer":
        """Start slapd (building the directory on first use) and wait until a
        bind as ``admin_dn`` succeeds."""
        if self.alive:
            return self
        self._build()
        return self._launch(
            [self.slapd, "-d", self.loglevel, "-h", f"{self.url}/", "-F", str(self.config_dir)],
            timeout)

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self.connect(timeout=1.0).unbind()
                return
            except Exception as exc:   # not listening yet
                last = exc
            time.sleep(0.02)
        raise RuntimeError(f"slapd on port {self.port} not ready within {timeout}s "
                           f"({last!r}): {self.log_tail()}")


    # -- LDAP ------------------------------------------------------------
    def connect(self, bind: bool = True, timeout: float = 5.0):
        """A synchronous ldap3 Connection, bound as ``admin_dn`` unless ``bind=False``
        (anonymous).  The caller unbinds it."""
        import ldap3
        receive = max(1, math.ceil(timeout))   # ldap3 packs SO_RCVTIMEO as whole seconds
        server = ldap3.Server("127.0.0.1", port=self.port, get_info=ldap3.NONE,
                              connect_timeout=timeout)
        if not bind:
            return ldap3.Connection(server, auto_bind=True, receive_timeout=receive)
        return ldap3.Connection(server, user=self.admin_dn, password=self.admin_password,
                                auto_bind=True, raise_exceptions=False, receive_timeout=receive)

    def host_dn(self, cn: str) -> str:
        from ldap3.utils.dn import escape_rdn
        return f"cn={escape_rdn(cn)},{self.hosts_dn}"

    def add_host(self, cn: str, mac: str, ip: str) -> str:
        """Add ``cn=<cn>,ou=hosts,dc=example,dc=net`` (device + ieee802Device +
        ipHost: cn, macAddress, ipHostNumber); returns its DN."""
        dn = self.host_dn(cn)
        conn = self.connect()
        try:
            ok = conn.add(dn, ["top", "device", "ieee802Device", "ipHost"],
                          {"cn": cn, "macAddress": mac, "ipHostNumber": ip})
            if not ok:
                raise SlapdError(f"add {dn}: {conn.result}")
        finally:
            conn.unbind()
        return dn

    def delete(self, dn: str) -> None:
        """Delete one entry (a leaf); SlapdError when slapd refuses."""
        conn = self.connect()
        try:
            if not conn.delete(dn):
                raise SlapdError(f"delete {dn}: {conn.result}")
        finally:
            conn.unbind()

    def add_ldif(self, text: str) -> None:
        """Apply LDIF with ``ldapmodify -a`` bound as admin: records without a
        changetype are added; ``changetype: modify/delete/modrdn`` also work."""
        result = subprocess.run(
            [find_ldapmodify() or "ldapmodify", "-a", "-x", "-H", self.url,
             "-D", self.admin_dn, "-w", self.admin_password],
            input=text, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise SlapdError(f"ldapmodify failed ({result.returncode}): "
                             f"{(result.stderr or result.stdout).strip()}")
