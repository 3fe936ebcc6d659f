"""SIP registrar benchmark: the appliance's sip service vs Kamailio, side by side, one run.

Everything on loopback, sipp (Debian ``sip-tester``) on the same box as the server
(compare in one run: they share the CPUs).

* appliance: ``twistd -n appliance`` with ``[services.sip]`` on 127.0.0.1 (UDP), the
  shipped defaults (store ``memory``, ``fsync = "always"``: each 200 OK waits for the
  binding's SQLite commit, group-committed per reactor turn);
  ``auth``: ``[services.sip.auth]`` with ``algorithms = ["MD5"]`` (sipp 3.6 answers MD5 only);
* kamailio: Debian ``kamailio``, ``registrar`` + ``usrloc`` (``db_mode`` 0, in memory),
  ``children = 2``; ``auth``: ``pv_www_authenticate`` with a fixed password.

Load: ``sipp -r RATE`` with one REGISTER per call, unique users (``u<call number>``) for
``noauth``; for ``auth`` each call is challenged and answers the digest, all calls as
one user (sipp 3.6 cannot take digest users from an injection file; every call still has
its own Call-ID, so each one is a full challenge + write).

Rate: double the offered rate while a run is clean (< 0.1 % failed calls and >= 95 %
of the offered rate completed over the whole sipp run), then bisect between the last clean and the first unclean
rate; ``register_per_s`` is the completed rate of the best clean run (REGISTER
transactions per second that got their 200; with auth each also had a 401 first).

Pairs (``sync``, ``async``): two appliance nodes on loopback (127.0.0.1, 127.0.0.2) with
the TLS peer link, load at a; ``lost_bindings``: sipp registers unique users at the best
clean rate, a gets SIGKILL a few seconds in, lost = 200 OKs received - those users'
bindings on b (one death per case; loopback has no link to pull).

Not measured yet (null rows with the reason): ``resync_s_100k``, the Kamailio
``dmq-pair``, 20 deaths per case, the overload rates.

    python bench/sip.py [--quick] [--json] [--duration S] [--skip-kamailio]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import report  # noqa: E402

REALM = "example.test"
USER, PASSWORD = "benchuser", "benchpw"
KAMAILIO_MODULES = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    from tests.support.node_process import free_port as fp
    return fp()


# ---------------------------------------------------------------------------
# systems
# ---------------------------------------------------------------------------
class Appliance:
    name = "appliance"

    def __init__(self, work: Path, auth: bool):
        self.work, self.auth, self.port = work, auth, free_port()
        self.node = None

    def start(self) -> None:
        from services.sip.auth import ha1
        from tests.support.node_process import NodeProcess
        body = f"""
[services.sip]
listen_address = "127.0.0.1"
port = {self.port}
domains = ["{REALM}"]
"""
        if self.auth:
            f = self.work / "users.ha1"
            f.write_text(f"{USER}:{REALM}:{ha1('MD5', USER, REALM, PASSWORD)}\n")
            body += f"""
[services.sip.auth]
realm = "{REALM}"
ha1_file = "{f}"
algorithms = ["MD5"]
"""
        self.node = NodeProcess(self.work, body).start()

    def stop(self) -> None:
        if self.node is not None:
            self.node.terminate()


class AppliancePair:
    """Two nodes on loopback (127.0.0.1 = a, 127.0.0.2 = b), the TLS peer link, sip
    replication a -> b (and b -> a) in ``mode``; load goes to a."""

    name = "appliance"

    def __init__(self, work: Path, mode: str):
        self.work, self.mode = work, mode
        self.port = free_port()
        self.nodes = {}

    def start(self) -> None:
        from tests.support.node_process import NodeProcess, env_with_dropins
        addr = {"a": "127.0.0.1", "b": "127.0.0.2"}
        keys = self.work / "keys"
        subprocess.run([sys.executable, "-m", "appliance.cluster.keys", str(keys), "--node",
                        "a=127.0.0.1", "--node", "b=127.0.0.2"], check=True,
                       capture_output=True, env=env_with_dropins())
        hb, link = free_port(), free_port()
        for me, other in (("a", "b"), ("b", "a")):
            d = self.work / me
            d.mkdir(exist_ok=True)
            body = f"""
[cluster]
peers = [{{ id = "{other}", address = "{addr[other]}" }}]
bind_address = "{addr[me]}"
heartbeat_port = {hb}
heartbeat_interval_ms = 100
dead_after = 3
auth_key_file = "{keys}/cluster.key"
peer_link = "ssl:{link}"
tls = {{ cert = "{keys}/{me}.pem", key = "{keys}/{me}.key", ca = "{keys}/ca.pem" }}

[services.sip]
listen_address = "{addr[me]}"
port = {self.port}
domains = ["{REALM}"]

[services.sip.replication]
peers = ["{other}"]
mode = "{self.mode}"
"""
            self.nodes[me] = NodeProcess(d, body, node_id=me).start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            st = self.nodes["a"].rpc("cluster.status")["result"]
            if st["peer_link"]["b"]["connected"]:
                return
            time.sleep(0.1)
        raise RuntimeError("peer link did not come up")

    def stop(self) -> None:
        for n in self.nodes.values():
            n.kill()


def lost_bindings(pair: "AppliancePair", work: Path, rate: int, run_s: float) -> dict:
    """sipp registers unique users at a; a is killed (SIGKILL) ``run_s`` seconds in;
    lost = 200 OKs sipp received - bindings of those users found on b."""
    import threading

    from tests.support import sipp
    prefix = f"loss{pair.mode}x"
    result = {}

    def load():
        result["r"] = sipp.run_sipp(work / "loss", sipp.register_only(REALM, prefix=prefix),
                                    f"127.0.0.1:{pair.port}", calls=int(rate * (run_s + 3)),
                                    rate=rate, limit=max(1000, rate * 2), timeout_s=run_s + 6)
    t = threading.Thread(target=load)
    t.start()
    time.sleep(run_s)
    pair.nodes["a"].kill()
    t.join()
    r = result["r"]
    rows = pair.nodes["b"].rpc("sip.bindings")["result"]["bindings"]
    found = {row["aor"] for row in rows if row["aor"].startswith(f"sip:{prefix}")}
    log(f"  appliance {pair.mode} death at {rate}/s: {r.successful} 200 OKs, {len(found)} "
        f"bindings on the backup")
    return {"acked": r.successful, "found": len(found), "lost": max(0, r.successful - len(found))}


KAMAILIO_CFG = """#!KAMAILIO
debug=1
log_stderror=yes
children=2
listen=udp:127.0.0.1:{port}
mpath="{modules}"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "textops.so"
loadmodule "siputils.so"
{auth_load}
modparam("usrloc", "db_mode", 0)
request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (is_method("REGISTER")) {{
{auth_route}
        if (!save("location")) {{ sl_reply_error(); }}
        exit;
    }}
    sl_send_reply("404", "Not Here");
}}
"""


class Kamailio:
    name = "kamailio"

    def __init__(self, work: Path, auth: bool):
        self.work, self.auth, self.port = work, auth, free_port()
        self.proc = None

    def start(self) -> None:
        auth_load = 'loadmodule "auth.so"' if self.auth else ""
        auth_route = (f'        if (!pv_www_authenticate("{REALM}", "{PASSWORD}", "0")) '
                      f'{{ www_challenge("{REALM}", "0"); exit; }}') if self.auth else ""
        cfg = self.work / "kamailio.cfg"
        cfg.write_text(KAMAILIO_CFG.format(port=self.port, modules=KAMAILIO_MODULES,
                                           auth_load=auth_load, auth_route=auth_route))
        self.logf = open(self.work / "kamailio.log", "w")
        self.proc = subprocess.Popen(["kamailio", "-f", str(cfg), "-DD", "-E", "-w", str(self.work),
                                      "-P", str(self.work / "k.pid"), "-m", "256"],
                                     stdout=self.logf, stderr=subprocess.STDOUT)
        time.sleep(1.0)
        if self.proc.poll() is not None:
            raise RuntimeError("kamailio exited: " + (self.work / "kamailio.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.logf.close()


# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------
def probe(system, work: Path, rate: int, duration: float, auth: bool, n: int) -> dict:
    from tests.support import sipp
    calls = max(1, int(rate * duration))
    if auth:
        xml, extra = sipp.auth_success(REALM), sipp.user_args(USER, PASSWORD)
    else:
        xml, extra = sipp.register_only(REALM, prefix=f"r{n}x"), ()
    r = sipp.run_sipp(work / f"probe{n}", xml, f"127.0.0.1:{system.port}", calls=calls,
                      rate=rate, limit=max(1000, rate * 2), timeout_s=duration + 20,
                      extra=extra + ("-rate_max", str(rate)))
    total = r.successful + r.failed
    achieved = r.successful / r.elapsed_s if r.elapsed_s > 0 else 0.0
    fail_pct = 100.0 * r.failed / total if total else 100.0
    # completed rate over the whole sipp run (start-up and the last answers included)
    clean = total >= calls and fail_pct < 0.1 and achieved >= 0.95 * rate
    log(f"  {system.name} {'auth' if auth else 'noauth'} rate {rate}: {r.successful} ok, "
        f"{r.failed} failed, {achieved:.0f}/s in {r.elapsed_s:.1f}s -> "
        f"{'clean' if clean else 'NOT clean'}")
    return {"rate": rate, "achieved": achieved, "fail_pct": fail_pct, "clean": clean}


def rate_search(system, work: Path, auth: bool, start: int, duration: float, trials: int):
    best, bad, rate, n = None, None, start, 0
    for _ in range(trials):
        n += 1
        r = probe(system, work, rate, duration, auth, n)
        if r["clean"]:
            if best is None or r["achieved"] > best["achieved"]:
                best = r
            rate = rate * 2 if bad is None else (rate + bad) // 2
        else:
            bad = rate
            low = best["rate"] if best else start // 4
            rate = (low + bad) // 2
        if best and bad and bad - best["rate"] <= max(50, best["rate"] // 10):
            break
    return best


def have(binary: str, package: str) -> str | None:
    if shutil.which(binary):
        return None
    return f"{binary} not installed: apt-get install -y --no-install-recommends {package}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short version (under a minute)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--duration", type=float, help="seconds per sipp probe")
    ap.add_argument("--trials", type=int, help="probes per system and case")
    ap.add_argument("--skip-kamailio", action="store_true")
    args = ap.parse_args(argv)
    duration = args.duration or (2.0 if args.quick else 8.0)
    trials = args.trials or (2 if args.quick else 6)
    start = 500 if args.quick else 1000
    rows: list[dict] = []

    def row(system, case, metric, value, unit, note=""):
        rows.append({"system": system, "case": case, "metric": metric,
                     "value": None if value is None else round(float(value), 2), "unit": unit,
                     "note": note})

    missing_sipp = have("sipp", "sip-tester")
    missing_kam = have("kamailio", "kamailio")
    systems = [(Appliance, None)]
    if not args.skip_kamailio:
        systems.append((Kamailio, missing_kam))
    with tempfile.TemporaryDirectory(prefix="sipb-") as tmp:
        for cls, why in systems:
            for case in ("noauth", "auth"):
                auth = case == "auth"
                reason = missing_sipp or why
                if reason:
                    log(f"sip bench: {cls.name} {case}: {reason}")
                    row(cls.name, case, "register_per_s", None, "REGISTER/s", reason)
                    continue
                work = Path(tmp) / f"{cls.name}-{case}"
                work.mkdir()
                system = cls(work, auth)
                try:
                    system.start()
                    best = rate_search(system, work, auth, start, duration, trials)
                    note = "unique users" if not auth else "one user, challenge per call"
                    if best is None:
                        note += "; no clean run"
                    row(cls.name, case, "register_per_s", best and best["achieved"],
                        "REGISTER/s", note)
                except Exception as e:          # a broken system gives a null row, not a crash
                    log(f"sip bench: {cls.name} {case}: FAILED: {e}")
                    row(cls.name, case, "register_per_s", None, "REGISTER/s", f"failed: {e}")
                finally:
                    system.stop()
    for case in ("sync", "async"):
        with tempfile.TemporaryDirectory(prefix="sipp-pair-") as tmp:
            work = Path(tmp)
            pair = AppliancePair(work, case)
            try:
                if missing_sipp:
                    raise RuntimeError(missing_sipp)
                pair.start()
                best = rate_search(pair, work, False, start, duration, trials)
                row("appliance", case, "register_per_s", best and best["achieved"],
                    "REGISTER/s", "pair on loopback, load at a, unique users")
                loss_rate = int(best["rate"]) if best else start
                lost = lost_bindings(pair, work, loss_rate, 1.5 if args.quick else 4.0)
                row("appliance", case, "lost_bindings", lost["lost"], "bindings",
                    f"one kill -9 of a at {loss_rate}/s ({lost['acked']} acked); loopback, "
                    "no link to pull")
            except Exception as e:
                log(f"sip bench: appliance {case}: FAILED: {e}")
                row("appliance", case, "register_per_s", None, "REGISTER/s", f"failed: {e}")
                row("appliance", case, "lost_bindings", None, "bindings", f"failed: {e}")
            finally:
                pair.stop()
        row("appliance", case, "resync_s_100k", None, "s", "not measured yet")
    for metric, unit in (("register_per_s", "REGISTER/s"), ("lost_bindings", "bindings"),
                         ("resync_s_100k", "s")):
        row("kamailio", "dmq-pair", metric, None, unit, "dmq pair not scripted yet")
    return report("sip", rows, args.json, extra=("note",))


if __name__ == "__main__":
    sys.exit(main())
