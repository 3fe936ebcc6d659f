"""A sip pair in namespaces behind a VIP (the registrar follows the VIP's resource),
sync replication over the TLS peer link, sipp registering through the VIP from a client
namespace.  Each round kills the node that holds the VIP the way a box dies (kill -9 and
link down) while sipp registers; every user whose REGISTER got a 200 (read from sipp's
message trace) must be found on the survivor, and an INVITE through the VIP reaches the
survivor and gets 302 to the user's contact.  The dead node then comes back like a
rebooted box (no VIP on its NIC, link up, process started), catches up, and the next
round kills the other one.

Rounds: ``SIP_VIP_FAILOVERS`` (default 2, under a minute; 20 for the long run)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support import sipp
from tests.support.cluster_lab import wait_for
from tests.support.node_process import env_with_dropins, twistd_command
from tests.support.require import require_binary

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.support.netns"]

ADDR = {"a": "10.77.0.1", "b": "10.77.0.2"}
OTHER = {"a": "b", "b": "a"}
VIP = "10.77.0.100"
ROUNDS = int(os.environ.get("SIP_VIP_FAILOVERS", "2"))
USERS_PER_ROUND = int(os.environ.get("SIP_VIP_USERS", "150"))
RATE = int(os.environ.get("SIP_VIP_RATE", "100"))

INVITE = r"""
import socket, sys
user, vip = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
s.settimeout(1.0)
msg = (f"INVITE sip:{user}@example.test SIP/2.0\r\n"
       f"Via: SIP/2.0/UDP 10.77.0.10:{s.getsockname()[1]};branch=z9hG4bKv{user}\r\n"
       f"From: <sip:caller@example.test>;tag=1\r\nTo: <sip:{user}@example.test>\r\n"
       f"Call-ID: vip-{user}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
       f"Content-Length: 0\r\n\r\n").encode()
for _ in range(5):
    s.sendto(msg, (vip, 5060))
    try:
        print(s.recv(65535).decode())
        break
    except socket.timeout:
        pass
"""


def node_config(node: str, tmp, keys) -> str:
    peer = OTHER[node]
    return f"""
[node]
id = "{node}"
state_dir = "{tmp}/state-{node}"

[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{tmp}/state-{node}/admin.token"

[cluster]
peers = [{{ id = "{peer}", address = "{ADDR[peer]}" }}]
bind_address = "{ADDR[node]}"
heartbeat_interval_ms = 100
dead_after = 3
auth_key_file = "{keys}/cluster.key"
peer_link = "ssl:8742"
tls = {{ cert = "{keys}/{node}.pem", key = "{keys}/{node}.key", ca = "{keys}/ca.pem" }}
auto_partner_down_s = 0

[[vip]]
name = "vip-sip"
address = "{VIP}/24"
interface = "eth0"
priority = {{ a = 200, b = 100 }}
preempt = false

[services.sip]
listen_address = "0.0.0.0"
port = 5060
domains = ["example.test"]
resource = "vip-sip"

[services.sip.replication]
peers = ["{peer}"]
mode = "sync"
timeout_s = 2
"""


class Pair:
    def __init__(self, lab, tmp):
        self.lab, self.tmp = lab, tmp
        keys = tmp / "keys"
        subprocess.run([sys.executable, "-m", "appliance.cluster.keys", str(keys), "--node",
                        f"a={ADDR['a']}", "--node", f"b={ADDR['b']}"], check=True,
                       capture_output=True, env=env_with_dropins())
        self.procs = {}
        for node in ("a", "b"):
            (tmp / f"{node}.toml").write_text(node_config(node, tmp, keys))
        self.start("a", "w")            # b starts once a owns the VIP (no start race)

    def start(self, node, mode="a"):
        log = open(self.tmp / f"{node}.log", mode)
        self.procs[node] = self.lab.popen(node, *twistd_command(), "-c",
                                          str(self.tmp / f"{node}.toml"), stdout=log,
                                          stderr=subprocess.STDOUT, cwd=str(self.tmp),
                                          env=env_with_dropins())

    def rpc(self, node, method, params=None):
        args = [sys.executable, "-m", "appliance.admin.ctl", "--url",
                "http://127.0.0.1:8740/rpc", "--token-file",
                f"{self.tmp}/state-{node}/admin.token", "--json", "call", method]
        if params is not None:
            args.append(json.dumps(params))
        res = self.lab.run(node, *args, check=False, timeout=30)
        return json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr.strip()}

    def role(self, node):
        return self.rpc(node, "sip.stats").get("role")

    def owner(self):
        for node in ("a", "b"):
            if self.role(node) == "owner":
                return node
        return None

    def logs(self):
        out = []
        for n in ("a", "b"):
            f = self.tmp / f"{n}.log"
            lines = f.read_text().splitlines() if f.exists() else []
            keep = [ln for ln in lines if "services.sip" in ln or "resource vip-sip" in ln
                    or "peer link to" in ln or "Traceback" in ln or "Error" in ln]
            out.append(f"--- {n}\n" + "\n".join(keep[-25:]) + f"\n--- {n} (last lines)\n"
                       + "\n".join(lines[-15:]))
        return "\n".join(out)


def acked_users(log_text: str, prefix: str) -> set[str]:
    """Users whose REGISTER got a 200, from sipp's -trace_msg log."""
    users = set()
    for block in log_text.split("message received"):
        head = block.split("\n\n", 1)[-1].lstrip()
        if head.startswith("SIP/2.0 200") and "REGISTER" in head:
            m = re.search(rf"^To:\s*<sip:({prefix}\d+)@", head, re.MULTILINE)
            if m:
                users.add(m.group(1))
    return users


def invite(lab, user) -> str:
    return lab.run("client", sys.executable, "-c", INVITE, user, VIP, check=False).stdout


def test_failovers_under_sipp_lose_no_acknowledged_binding(two_nodes_lab, tmp_path):
    """Register through the VIP; kill -9 + link down the VIP holder while sipp registers;
    the survivor holds every 200'd binding and redirects an INVITE through the VIP to the
    contact; the dead node returns and catches up; repeat ROUNDS times."""
    require_binary("sipp")
    lab = two_nodes_lab
    pair = Pair(lab, tmp_path)
    wait_for(lambda: pair.owner() == "a", 20, "a owning vip-sip\n" + pair.logs())
    pair.start("b", "w")
    wait_for(lambda: pair.rpc("a", "cluster.status").get("peer_link", {}).get("b", {})
             .get("connected"), 20, "the peer link\n" + pair.logs())
    xml = tmp_path / "register.xml"
    all_acked: dict[str, str] = {}
    started = time.monotonic()
    for rnd in range(ROUNDS):
        owner = pair.owner()
        survivor = OTHER[owner]
        prefix = f"r{rnd}u"
        xml.write_text(sipp.register_only(prefix=prefix))
        work = tmp_path / f"sipp{rnd}"
        work.mkdir()
        load = lab.popen("client", sipp.sipp_binary() or "sipp", f"{VIP}:5060", "-sf", str(xml),
                         "-m", str(USERS_PER_ROUND), "-r", str(RATE), "-l", "200",
                         "-t", "u1", "-i", "10.77.0.10", "-nostdin", "-trace_msg",
                         "-timeout", "30s", "-max_recv_loops", "1000", cwd=str(work),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(USERS_PER_ROUND / RATE / 2)        # mid-load
        os.kill(pair.procs[owner].pid, signal.SIGKILL)
        lab.link_down(owner)
        wait_for(lambda: pair.role(survivor) == "owner", 10,
                 f"round {rnd}: {survivor} taking over\n" + pair.logs())
        load.wait(timeout=60)
        text = "".join(p.read_text(errors="replace") for p in work.glob("*_messages.log"))
        acked = acked_users(text, prefix)
        assert len(acked) > USERS_PER_ROUND // 3, f"round {rnd}: only {len(acked)} 200s"
        rows = pair.rpc(survivor, "sip.bindings")["bindings"]
        found = {r["aor"].split(":", 1)[1].split("@")[0]: r["contact"] for r in rows}
        lost = sorted(u for u in list(all_acked) + sorted(acked) if u not in found)
        assert lost == [], f"round {rnd}: {len(lost)} acknowledged bindings lost: {lost[:10]}"
        for u in acked:
            all_acked[u] = found[u]
        # an INVITE through the VIP reaches the survivor: 302 to the contact
        user = sorted(acked)[0]
        answer = invite(lab, user)
        assert answer.startswith("SIP/2.0 302"), answer
        assert all_acked[user] in answer
        # the dead box reboots: no VIP on its NIC, link up, process started
        lab.run(owner, "ip", "addr", "del", f"{VIP}/24", "dev", "eth0", check=False)
        lab.link_up(owner)
        pair.start(owner)
        # back: linked, and neither node owes the other anything (the cluster may also
        # have moved the VIP to it again: whoever owns it next round must have it all)
        wait_for(lambda: pair.role(owner) in ("backup", "owner"), 20,
                 f"round {rnd}: {owner} back\n" + pair.logs())

        def caught_up():
            for n in ("a", "b"):
                repl = pair.rpc(n, "sip.stats").get("replication") or {}
                other = OTHER[n]
                if (repl.get("backlog", {}).get(other) != 0
                        or repl.get("full_resync_needed", {}).get(other)
                        or repl.get("peer_bindings", {}).get(other) is None):
                    return False
            return True
        try:
            wait_for(caught_up, 30, f"round {rnd}: {owner} caught up")
        except AssertionError as e:
            raise AssertionError(f"{e}: {pair.rpc(survivor, 'sip.stats').get('replication')}\n"
                                 + pair.logs()) from None
        for n in ("a", "b"):
            rows = pair.rpc(n, "sip.bindings")["bindings"]
            have = {r["aor"].split(":", 1)[1].split("@")[0] for r in rows}
            missing = sorted(set(all_acked) - have)
            assert missing == [], f"round {rnd}: {n} lacks {len(missing)}: {missing[:10]}"
    assert pair.owner() in ("a", "b")
    print(f"{ROUNDS} failovers, {len(all_acked)} acknowledged bindings, none lost, "
          f"{time.monotonic() - started:.0f}s")
