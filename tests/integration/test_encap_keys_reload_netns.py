"""config.reload of the DNs' per-EN keys file in namespaces (real twistd nodes, the
L2 lab): en1 is removed from the keys file and both DNs reload their config: en1's
sessions end at once (encap.sessions), it cannot handshake again (unknown_en), its
echoes stop; put back and reloaded, it is served again without any DN restart."""

from __future__ import annotations

import os
import time

import pytest

from tests.support.encap_lab import SERVER, EncapLab
from tests.support.netns import Lab
from tests.support.require import require_root

pytest_plugins = ["tests.support.netns"]
pytestmark = pytest.mark.integration


def sessions_of(el, dn: str) -> list[str]:
    return [s["en"] for s in el.rpc(dn, "encap.sessions")["sessions"]]


def test_reloading_the_keys_file_ends_a_removed_ens_sessions(netns_lab: Lab, tmp_path):
    require_root()
    lab = netns_lab
    el = EncapLab(lab, tmp_path).build()            # per-EN keys, L2 routing
    el.start_dn("dn1")
    el.start_dn("dn2")
    el.start_en()
    el.wait_en(lambda s: s.get("configured") and s.get("confirmed"), what="address")
    assert "en1" in sessions_of(el, "dn1") and "en1" in sessions_of(el, "dn2")
    pids = {dn: el.procs[dn].pid for dn in ("dn1", "dn2")}
    keys = el.en_keys.read_text()
    el.en_keys.write_text("".join(line + "\n" for line in keys.splitlines()
                                  if not line.startswith("en1 ")))
    for dn in ("dn1", "dn2"):
        out = el.rpc(dn, "config.reload")
        assert "services.encap: reconfigured" in out["applied"], out
    for dn in ("dn1", "dn2"):
        assert "en1" not in sessions_of(el, dn)
    el.wait_en(lambda s: all(link["state"] != "up" for link in s["links"].values()),
               timeout=10, what="the EN without sessions")
    time.sleep(0.5)                                 # its HELLOs go unanswered
    for dn in ("dn1", "dn2"):
        assert "en1" not in sessions_of(el, dn)
        assert el.rpc(dn, "encap.stats")["drops"].get("unknown_en", 0) >= 1
    ping = lab.run("en", "ping", "-c", "2", "-i", "0.2", "-W", "1", SERVER, check=False)
    assert " 100% packet loss" in ping.stdout, ping.stdout
    # back in the file: served again, same DN processes
    el.en_keys.write_text(keys)
    for dn in ("dn1", "dn2"):
        assert "services.encap: reconfigured" in el.rpc(dn, "config.reload")["applied"]
    el.wait_en(lambda s: s.get("confirmed") and all(
        link["state"] == "up" for link in s["links"].values()), timeout=15, what="served again")
    ping = lab.run("en", "ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER, check=False)
    assert " 0% packet loss" in ping.stdout, ping.stdout
    assert {dn: el.procs[dn].pid for dn in ("dn1", "dn2")} == pids
    for dn in ("dn1", "dn2"):
        os.kill(pids[dn], 0)                        # never restarted
