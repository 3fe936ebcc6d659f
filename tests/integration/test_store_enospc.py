"""The embedded store on a full disk: a state, not a hang.

A child process (``python -m tests.support.store_writer enospc DIR MODE``)
runs in a private mount namespace (``unshare -m --propagation private``)
with an 8 MiB tmpfs mounted on DIR.  It writes a 4 MiB ballast file,
starts an :class:`~appliance.store.embedded.EmbeddedStore` (fsync="always")
there and writes 2 KiB values, 8 in flight, until a write fails; then fills
what is left of the disk with a second file, asks the store to recover while
the disk is still full, removes both files and recovers by
``store.recheck()`` (MODE ``recheck``) or by the store's own retry (MODE
``retry``), writes again, and restarts the store.  It reports each step as
``WORD <json>`` on stdout; the tests below check them.

A second geometry (2 MiB disk, 512 KiB ballast) checks a bug this test
found: after the store filled the disk itself, a one-row probe write fits in
the WAL space the failed transaction had already taken, so recheck() and the
automatic retry called the store healthy with 0 bytes free (store_down
flapped).  The probe now also wants 256 KiB free.

Node level: a twistd node with the sip service and its state dir on a
4 MiB tmpfs (the node itself runs under ``unshare -m``; the test reaches its
files through ``/proc/<pid>/root``): REGISTERs fill the disk, the status
shows the store unhealthy, REGISTER gets 500, recheck after freeing the
space brings it back, and while the disk stays full the node never reports
the store healthy (the same probe bug).

Needs root, ``unshare`` and ``mount``; skips without them on a laptop, fails
under CI (tests.support.require).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.require import require_binary, require_root, unavailable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
_results: dict[str, dict] = {}


def run_scenario(tmp_dir: Path, mode: str, disk: str = "8m", ballast_kib: int = 4096,
                 complete: bool = True) -> dict:
    """Run the child once per (mode, disk) and session; return {WORD: fields}
    (``_log``: its output, for assertion messages)."""
    key = f"{mode}-{disk}"
    if key not in _results:
        require_root()
        require_binary("unshare")
        require_binary("mount")
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            unavailable(f"cannot make a private mount namespace (unshare -m): "
                        f"{probe.stderr.strip()}")
        mnt = tmp_dir / f"disk-{key}"
        mnt.mkdir()
        script = (f'mount -t tmpfs -o size={disk} tmpfs "$0" && exec "$1" -m '
                  f'tests.support.store_writer enospc "$0" "$2" "$3"')
        proc = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(mnt),
             sys.executable, mode, str(ballast_kib)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        out = {}
        for line in proc.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word.isupper() and rest.startswith("{"):
                out[word] = json.loads(rest)
        out["_log"] = (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                       f"stderr:\n{proc.stderr[-4000:]}")
        _results[key] = out
    out = _results[key]
    if complete:
        assert "RESULT" in out, out["_log"]
    return out


@pytest.mark.parametrize("mode", ["recheck", "retry"])
def test_disk_full_fails_writes_and_the_store_recovers(tmp_path, mode):
    """Writes fail with StoreDown "disk is full"; nothing issued after the
    first failure is acknowledged; unhealthy with the reason; after the space
    is freed (recheck, or the automatic retry) writes are acknowledged again
    and a restarted store holds every acknowledged write."""
    r = run_scenario(tmp_path, mode)
    log = r["_log"]
    full = r["FULL"]
    assert full["acked"] > 0 and full["failed"] > 0, log
    assert full["errors"] and all(e.startswith("StoreDown: ") and "full" in e
                                  for e in full["errors"]), log
    assert full["acked_after_first_fail"] == [], log
    assert full["max_acked"] < full["first_fail"], log
    assert full["still_pending"] == 0, log                     # nothing hangs
    assert [k for _, k, _ in full["late"]] == ["StoreDown"] * 5, log
    assert full["durable"] == ["StoreDown"], log
    health = r["HEALTH"]
    assert health["healthy"] is False, log
    assert "full" in health["error"], log
    rec = r["RECOVERED"]
    assert rec["healthy"] is True and rec["error"] is None, log
    if mode == "retry":
        assert rec["after_s"] < 20, log
    after = r["WRITES_AFTER"]
    assert after["acked"] == list(range(20)) and after["failed"] == [], log
    assert after["missing_acked"] == [], log
    assert after["failed_present"] == [], log                 # failed writes were rolled back
    restart = r["RESTART"]
    assert restart["healthy"] is True, log
    assert restart["missing_acked"] == [] and restart["missing_after"] == [], log
    assert restart["failed_present"] == [] and restart["late_present"] == [], log


@pytest.mark.parametrize("mode", ["recheck", "retry"])
def test_a_store_on_a_still_full_disk_stays_down(tmp_path, mode):
    """2 MiB disk, 512 KiB ballast: when the store has filled the disk and a
    file took the rest (0 bytes free), recheck() and the 1 s retry must not
    report the store healthy."""
    r = run_scenario(tmp_path, mode, disk="2m", ballast_kib=512, complete=False)
    assert r["FILLED"]["free_bytes"] == 0, r["_log"]
    seen = r["RECHECK_FULL"] if mode == "recheck" else r["RETRY_FULL"]
    assert seen["healthy"] is False, r["_log"]
    assert "full" in (seen["error"] or ""), r["_log"]


def _register(sock, port: int, n: int) -> str:
    """One SIP REGISTER for user ``u<n>`` (a store write); the status line."""
    lport = sock.getsockname()[1]
    msg = (f"REGISTER sip:example.test SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bKenospc{n}\r\n"
           f"Max-Forwards: 70\r\n"
           f"From: <sip:u{n}@example.test>;tag=t{n}\r\n"
           f"To: <sip:u{n}@example.test>\r\n"
           f"Call-ID: enospc-{n}@test\r\n"
           f"CSeq: 1 REGISTER\r\n"
           f"Contact: <sip:u{n}@127.0.0.1:{lport}>;+sip.pad=\"{'p' * 600}\"\r\n"
           f"Expires: 3600\r\n"
           f"Content-Length: 0\r\n\r\n")
    sock.sendto(msg.encode(), ("127.0.0.1", port))
    try:
        data, _ = sock.recvfrom(65535)
    except OSError:
        return "timeout"
    return data.decode(errors="replace").split("\r\n", 1)[0]


def _node_scenario(tmp_path, watch_s: float = 0.0) -> dict:
    """A twistd node (sip service) with its state dir on a 4 MiB tmpfs: SIP
    REGISTERs (store writes) fill the disk, ``system.status`` and
    ``appliancectl status`` show the store unhealthy with the reason and
    REGISTER stops getting 200 (500 Location Store Unavailable); with
    ``watch_s``, the status is polled that long while the disk stays full;
    then the file taking the space is removed, ``store.recheck`` makes the
    store healthy and REGISTER gets 200 again."""
    import socket
    import time

    from tests.support.node_process import env_with_dropins, free_port, twistd_command

    require_root()
    require_binary("unshare")
    require_binary("mount")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    state = mnt / "state"
    admin_port, sip_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(f"""
[node]
id = "enospc"
state_dir = "{state}"

[admin]
listen = "tcp:{admin_port}:interface=127.0.0.1"
token_file = "{state}/admin.token"

[services.sip]
listen_address = "127.0.0.1"
port = {sip_port}
tcp = "tcp:{free_port()}:interface=127.0.0.1"
domains = ["example.test"]
""")
    log = open(tmp_path / "twistd.log", "w")
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"', str(mnt),
         *twistd_command(), "-c", str(config)],
        cwd=tmp_path, env=env_with_dropins(), stdout=log, stderr=subprocess.STDOUT)
    inside = Path(f"/proc/{proc.pid}/root") / str(mnt).lstrip("/")   # the node's view

    def output():
        return (tmp_path / "twistd.log").read_text()[-4000:]

    def rpc(method, params=None):
        import urllib.request
        body = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            body["params"] = params
        token = (inside / "state" / "admin.token").read_text().strip()
        req = urllib.request.Request(
            f"http://127.0.0.1:{admin_port}/rpc", data=json.dumps(body).encode(), method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(3)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, output()
            try:
                rpc("system.version")
                break
            except (OSError, ValueError):
                assert time.monotonic() < deadline, output()
                time.sleep(0.1)
        assert _register(sock, sip_port, 0).startswith("SIP/2.0 200"), output()
        # a file takes most of the disk; the registrations take the rest
        filler = inside / "filler"
        with open(filler, "wb") as f:
            try:
                f.write(b"\0" * (3 * 1024 * 1024))
            except OSError:
                pass
        answers = []
        for n in range(1, 3000):
            answers.append(_register(sock, sip_port, n))
            if not answers[-1].startswith("SIP/2.0 200"):
                break
        status = rpc("system.status")["result"]
        store = status.get("store", {})
        assert not answers[-1].startswith("SIP/2.0 200"), (answers[-3:], output())
        assert store.get("healthy") is False, (status, output())
        assert "full" in (store.get("error") or ""), (status, output())
        seen = {"healthy_while_full": [], "ctl": ""}
        if watch_s:
            ctl = subprocess.run(
                [sys.executable, "-m", "appliance.admin.ctl", "--url",
                 f"http://127.0.0.1:{admin_port}/rpc", "--token-file",
                 str(inside / "state" / "admin.token"), "status"],
                capture_output=True, text=True, timeout=15, env=env_with_dropins(),
                cwd=tmp_path)
            seen["ctl"] = ctl.stdout + ctl.stderr
            t0 = time.monotonic()
            while time.monotonic() - t0 < watch_s:
                st = rpc("system.status")["result"]["store"]
                if st.get("healthy"):
                    seen["healthy_while_full"].append(
                        (round(time.monotonic() - t0, 2), st.get("stats")))
                time.sleep(0.1)
        # another write while down: refused, not answered 200
        if not watch_s:
            assert not _register(sock, sip_port, 5000).startswith("SIP/2.0 200")
        filler.unlink()
        desc = rpc("store.recheck")["result"]
        assert desc.get("healthy") is True, (desc, output())
        assert rpc("system.status")["result"]["store"]["healthy"] is True
        assert _register(sock, sip_port, 6000).startswith("SIP/2.0 200"), output()
        print(f"node ENOSPC: {len(answers)} REGISTERs until {answers[-1]!r}; store error "
              f"{store.get('error')!r}")
        return seen
    finally:
        sock.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_node_reports_the_full_disk_and_recovers(tmp_path):
    """The node's status says the store is down (with the reason) and SIP
    REGISTER fails while the disk is full; freed + store.recheck: healthy,
    REGISTER answered 200."""
    _node_scenario(tmp_path)


def test_node_stays_store_down_while_the_disk_is_full(tmp_path):
    """While the disk stays full (3 s), appliancectl status shows the store
    UNHEALTHY and system.status never says healthy."""
    seen = _node_scenario(tmp_path, watch_s=3.0)
    assert "UNHEALTHY" in seen["ctl"] and "full" in seen["ctl"], seen["ctl"]
    assert seen["healthy_while_full"] == [], seen["healthy_while_full"][:5]
