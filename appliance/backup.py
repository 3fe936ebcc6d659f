"""``appliancectl backup FILE`` and ``appliancectl restore FILE --dir DIR``.

A backup is one ``.tar.gz`` holding:

* ``manifest.json`` -- version, node id, when, and for each file its original
  path and how the config names it;
* ``config/<name>.toml`` -- the node config;
* ``files/...`` -- every file the config names (``*_file`` keys, ``tls``
  cert/key/ca, ...): the HMAC key, the node's key and certificate, the CA
  certificate, service key files, the admin token; plus ``cluster.json`` of
  ``appliancectl cluster init/join`` when it sits next to the config.  The CA
  private key is left out unless ``--with-ca-key`` (keep it offline);
* ``state/store.sqlite3`` -- a consistent snapshot of the embedded store, made
  with SQLite's online backup API from ``<state_dir>/store.sqlite3`` while the
  node runs (a read transaction: every committed batch or none of it, never a
  torn file copy of the database and its WAL).  With ``backend = "redis"`` the
  data lives in Redis: back it up with Redis's own RDB/AOF (noted in the
  manifest).

``restore`` writes the config to ``DIR/<name>.toml``, the files under
``DIR`` (``keys/...`` as they were next to the config, others in
``DIR/files/``), rewrites the paths in the config to their new places, and
puts the store snapshot into the state dir (``--state-dir``, default the one
in the config).  It refuses to overwrite an existing config or store without
``--force``.

A restored store is older than the partner's: the node must not serve from it
as if nothing happened.  Restore leaves the **restored flag**
``<state_dir>/restored.json`` (:func:`restored`): when the backup was made, when
it was restored, and the services with a partner that must rejoin through it
(``pending``: dhcp4/dhcp6 with failover, sip with replication peers).  A
service asks ``restored(state_dir, "dhcp4")`` at start (truthy: start the
partner relationship in RECOVER, resync, then serve) and calls
``restored_done(state_dir, "dhcp4")`` once it is NORMAL again; the file goes
when nothing is pending.  It is never part of a backup.  For the dhcp4
service of this release restore also leaves its own marker
``<state_dir>/dhcp4.recovering-without-data`` (the service's own rule only
recovers an *empty* store).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import sqlite3
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

__all__ = ["backup", "restore", "backup_main", "snapshot_sqlite", "restored", "restored_done",
           "mark_restored"]

FORMAT = 1
STORE_FILE = "store.sqlite3"
RECOVER_MARKER = "dhcp4.recovering-without-data"
RESTORED_FILE = "restored.json"


class BackupError(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def snapshot_sqlite(source: Path, dest: Path) -> int:
    """Copy a live SQLite database with the online backup API; returns its page count.

    Opened read-only (``mode=ro``): the node's writer keeps writing; the copy is
    one consistent state of the database (WAL included)."""
    if not source.exists():
        raise BackupError(f"{source}: no store database (has the node run?)")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=10)
    try:
        dst = sqlite3.connect(str(dest))
        try:
            src.backup(dst, pages=256, sleep=0.005)
            pages = dst.execute("PRAGMA page_count").fetchone()[0]
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise BackupError(f"the snapshot of {source} fails integrity_check: {check}")
            dst.execute("PRAGMA journal_mode = DELETE")     # one self-contained file
        finally:
            dst.close()
    finally:
        src.close()
    return pages


def _referenced_files(data: Any, path: str = "") -> list[tuple[str, str]]:
    """``(key path, value)`` of every string in the config that names a file:
    keys ending in ``_file``, ``cert``/``key``/``ca`` of a TLS table, ``*_ca``."""
    out: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            kp = f"{path}.{k}" if path else str(k)
            if isinstance(v, str) and (k.endswith("_file") or k in ("cert", "key", "ca")
                                       or k.endswith("_ca") or k in ("certificate", "private_key")):
                out.append((kp, v))
            else:
                out += _referenced_files(v, kp)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _referenced_files(v, f"{path}[{i}]")
    return out


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def backup(config_path: str, out: Path, *, with_ca_key: bool = False,
           cwd: Path | None = None) -> dict[str, Any]:
    """Write the backup of the node configured by ``config_path`` to ``out``."""
    import tomllib
    cwd = Path.cwd() if cwd is None else cwd
    cfg_file = Path(config_path)
    if not cfg_file.is_absolute():
        cfg_file = cwd / cfg_file
    try:
        text = cfg_file.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (OSError, ValueError) as e:
        raise BackupError(f"{config_path}: {e}", 2) from None
    node = data.get("node") or {}
    state_dir = Path(str(node.get("state_dir", "")))
    if not state_dir.is_absolute():
        state_dir = cwd / state_dir
    backend = (data.get("store") or {}).get("backend", "memory")
    manifest: dict[str, Any] = {
        "format": FORMAT, "node_id": node.get("id"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"name": cfg_file.name, "path": str(cfg_file)},
        "state_dir": {"value": node.get("state_dir"), "path": str(state_dir)},
        "files": [], "store": {"backend": backend}}
    from appliance import __version__
    manifest["version"] = __version__
    seen: set[str] = set()
    entries = []
    for key, value in _referenced_files(data):
        p = Path(value) if Path(value).is_absolute() else cwd / value
        if not p.is_file() or str(p) in seen:
            continue
        seen.add(str(p))
        entries.append((key, value, p))
    extra = cfg_file.parent / "cluster.json"
    if extra.is_file():
        entries.append(("(cluster.json)", None, extra))
    ca_key = cfg_file.parent / "ca" / "ca.key"
    if with_ca_key and ca_key.is_file():
        entries.append(("(ca key)", None, ca_key))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    fd = os.open(tmp_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    try:
        with tarfile.open(tmp_out, "w:gz") as tar:
            _add_bytes(tar, f"config/{cfg_file.name}", text.encode(), 0o644)
            for i, (key, value, p) in enumerate(entries):
                try:
                    rel = p.resolve().relative_to(cfg_file.parent.resolve())
                    name = f"files/{rel}"
                except ValueError:
                    name = f"files/other/{i}-{p.name}"
                mode = p.stat().st_mode & 0o777
                _add_bytes(tar, name, p.read_bytes(), mode)
                manifest["files"].append({"name": name, "key": key, "value": value,
                                          "path": str(p), "mode": mode})
            if backend != "redis":
                with tempfile.TemporaryDirectory() as td:
                    snap = Path(td) / STORE_FILE
                    pages = snapshot_sqlite(state_dir / STORE_FILE, snap)
                    tar.add(str(snap), arcname=f"state/{STORE_FILE}")
                    manifest["store"].update(file=f"state/{STORE_FILE}", pages=pages,
                                             method="sqlite3 online backup")
            else:
                manifest["store"]["note"] = ("redis backend: the data is in Redis; back it up "
                                             "with Redis (RDB/AOF)")
            small = [p for p in (state_dir.iterdir() if state_dir.is_dir() else ())
                     if p.is_file() and not p.name.startswith(STORE_FILE)
                     and p.name not in (RESTORED_FILE, RECOVER_MARKER)
                     and p.stat().st_size < 1 << 20 and str(p) not in seen]
            for p in small:
                _add_bytes(tar, f"state/{p.name}", p.read_bytes(), p.stat().st_mode & 0o777)
            manifest["state_files"] = sorted(p.name for p in small)
            _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1).encode(), 0o644)
        os.replace(tmp_out, out)
    except BaseException:
        tmp_out.unlink(missing_ok=True)
        raise
    return manifest


def _safe_name(name: str) -> bool:
    return not (name.startswith("/") or ".." in Path(name).parts)


def restore(archive: Path, target: Path, *, state_dir: str | None = None,
            force: bool = False, recover: bool = True) -> dict[str, Any]:
    """Unpack ``archive`` into ``target`` (config + files) and the state dir."""
    try:
        tar = tarfile.open(archive, "r:gz")
    except (OSError, tarfile.TarError) as e:
        raise BackupError(f"{archive}: not a backup: {e}", 2) from None
    with tar:
        def read(name: str) -> bytes:
            try:
                member = tar.getmember(name)
            except KeyError:
                raise BackupError(f"{archive}: {name} missing") from None
            if not member.isfile() or not _safe_name(name):
                raise BackupError(f"{archive}: {name} is not a plain file")
            return tar.extractfile(member).read()

        manifest = json.loads(read("manifest.json"))
        if manifest.get("format") != FORMAT:
            raise BackupError(f"{archive}: backup format {manifest.get('format')!r} unknown")
        cfg_name = manifest["config"]["name"]
        text = read(f"config/{cfg_name}").decode()
        target.mkdir(parents=True, exist_ok=True)
        cfg_out = target / cfg_name
        if cfg_out.exists() and not force:
            raise BackupError(f"{cfg_out} exists (--force to replace it)")
        old_state = manifest["state_dir"]["value"]
        new_state = state_dir or manifest["state_dir"]["path"]
        new_state_path = Path(new_state).resolve()
        store_out = new_state_path / STORE_FILE
        if store_out.exists() and not force:
            raise BackupError(f"{store_out} exists (--force to replace it)")
        replacements: dict[str, str] = {}
        for f in manifest["files"]:
            name = f["name"]
            if not _safe_name(name):
                raise BackupError(f"{archive}: unsafe name {name!r}")
            dest = target / name[len("files/"):]
            if name.startswith("files/other/"):
                dest = target / "files" / name[len("files/other/"):]
            if f["path"].startswith(str(manifest["state_dir"]["path"]) + os.sep):
                dest = new_state_path / Path(f["path"]).name     # e.g. the admin token
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_file(dest, read(name), f.get("mode", 0o600))
            if f.get("value"):
                replacements[f["value"]] = str(dest.resolve())
        # the config, its paths pointing at the restored files
        for old, new in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(f'"{old}"', f'"{new}"')
        if old_state:
            text = re.sub(r'(^\s*state_dir\s*=\s*)"' + re.escape(old_state) + '"',
                          lambda m: f'{m.group(1)}"{new_state_path}"', text, flags=re.M)
            text = text.replace(f'"{old_state}/', f'"{new_state_path}/')
        _write_file(cfg_out, text.encode(), 0o644)
        new_state_path.mkdir(parents=True, exist_ok=True)
        for name in manifest.get("state_files", []):
            if "/" in name:
                continue
            _write_file(new_state_path / name, read(f"state/{name}"), 0o600)
        restored_store = False
        if manifest["store"].get("file"):
            for suffix in ("-wal", "-shm"):
                (new_state_path / (STORE_FILE + suffix)).unlink(missing_ok=True)
            _write_file(store_out, read(manifest["store"]["file"]), 0o600)
            restored_store = True
        marker = flag = None
        if recover and restored_store and _has_dhcp4_failover(text):
            marker = new_state_path / RECOVER_MARKER
            marker.touch()
        partnered = _services_with_partners(text)
        if recover and restored_store and partnered:
            flag = mark_restored(new_state_path, services=partnered,
                                 backup_created=manifest.get("created"),
                                 node_id=manifest.get("node_id"))
    return {"config": cfg_out, "state_dir": new_state_path, "store": restored_store,
            "manifest": manifest, "recover_marker": marker, "restored_flag": flag,
            "pending": partnered if flag else []}


def _services_with_partners(text: str) -> list[str]:
    """The services of a config that rejoin a partner after a restore."""
    import tomllib
    try:
        services = tomllib.loads(text).get("services") or {}
    except ValueError:
        return []
    out = []
    for key in ("dhcp4", "dhcp6"):
        table = services.get(key) or {}
        if table.get("failover") and table.get("enabled", True) is not False:
            out.append(key)
    sip = services.get("sip") or {}
    if (sip.get("replication") or {}).get("peers") and sip.get("enabled", True) is not False:
        out.append("sip")
    return out


def mark_restored(state_dir: Path, *, services: Sequence[str], backup_created: Any = None,
                  node_id: Any = None) -> Path:
    """Write the restored flag (fsynced): ``services`` must rejoin their partners."""
    path = Path(state_dir) / RESTORED_FILE
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    body = {"format": 1, "node_id": node_id, "backup_created": backup_created,
            "restored_at": now, "pending": sorted(set(services))}
    _write_file(path, json.dumps(body, indent=1).encode(), 0o600)
    return path


def restored(state_dir, service: str | None = None) -> dict[str, Any] | None:
    """The restored flag of ``state_dir`` (None: not restored, or nothing pending
    for ``service``).  An unreadable flag counts as pending for every service:
    recovering needlessly costs a resync, serving from old data costs leases."""
    if state_dir is None:
        return None
    path = Path(state_dir) / RESTORED_FILE
    try:
        body = json.loads(path.read_text())
        if not isinstance(body, dict) or not isinstance(body.get("pending"), list):
            raise ValueError("no pending list")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        body = {"format": None, "pending": None, "error": str(e)}
    if service is not None and body["pending"] is not None and service not in body["pending"]:
        return None
    return body


def restored_done(state_dir, service: str) -> bool:
    """``service`` rejoined its partner after the restore; True if the flag
    changed.  The file is removed when no service is pending any more."""
    body = restored(state_dir, service)
    if body is None:
        return False
    path = Path(state_dir) / RESTORED_FILE
    pending = [s for s in (body["pending"] or []) if s != service]
    if body["pending"] is None or not pending:
        path.unlink(missing_ok=True)
    else:
        body["pending"] = pending
        _write_file(path, json.dumps(body, indent=1).encode(), 0o600)
    return True


def _has_dhcp4_failover(text: str) -> bool:
    import tomllib
    try:
        data = tomllib.loads(text)
    except ValueError:
        return False
    dhcp4 = (data.get("services") or {}).get("dhcp4") or {}
    return bool(dhcp4.get("failover")) and dhcp4.get("enabled", True) is not False


def _write_file(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, mode & 0o777)
    os.replace(tmp, path)


def backup_main(argv: Sequence[str], stdout: TextIO, stderr: TextIO, *,
                config: str | None = None) -> int:
    """``appliancectl [--config PATH] backup FILE [--with-ca-key]`` and
    ``appliancectl restore FILE --dir DIR [--state-dir S] [--force]``."""
    command = argv[0]
    parser = argparse.ArgumentParser(prog=f"appliancectl {command}")
    parser.add_argument("file", type=Path)
    parser.add_argument("--config", default=None, help="the node config (default: "
                        "/etc/appliance/appliance.toml, else etc/appliance.toml)")
    if command == "backup":
        parser.add_argument("--with-ca-key", action="store_true",
                            help="include the cluster CA key (default: left out)")
    else:
        parser.add_argument("--dir", type=Path, required=True,
                            help="where the config and its files go, e.g. /etc/appliance")
        parser.add_argument("--state-dir", default=None,
                            help="state dir for the store (default: the config's)")
        parser.add_argument("--force", action="store_true")
        parser.add_argument("--no-recover", action="store_true",
                            help="no restored flag: the services serve from the backup's "
                                 "data as it is")
    args = parser.parse_args(list(argv[1:]))
    try:
        if command == "backup":
            path = args.config or config
            if path is None:
                path = next((p for p in ("/etc/appliance/appliance.toml", "etc/appliance.toml")
                             if os.path.exists(p)), None)
            if path is None:
                raise BackupError("no config: use --config PATH", 2)
            m = backup(path, args.file, with_ca_key=args.with_ca_key)
            stdout.write(f"backup of node {m['node_id']} written to {args.file}: config, "
                         f"{len(m['files'])} files, store "
                         + (f"snapshot ({m['store']['pages']} pages)" if m["store"].get("file")
                            else "not included (redis)") + "\n")
            return 0
        r = restore(args.file, args.dir, state_dir=args.state_dir, force=args.force,
                    recover=not args.no_recover)
        stdout.write(f"restored node {r['manifest']['node_id']}: config {r['config']}, "
                     f"state {r['state_dir']}"
                     + (f"; restored flag set: {', '.join(r['pending'])} rejoin through "
                        "their partner (RECOVER / resync) before serving"
                        if r["restored_flag"] else "") + "\n")
        return 0
    except BackupError as e:
        stderr.write(f"appliancectl: {command}: {e}\n")
        return e.exit_code
    except (OSError, sqlite3.Error, tarfile.TarError) as e:
        stderr.write(f"appliancectl: {command}: {e}\n")
        return 1
