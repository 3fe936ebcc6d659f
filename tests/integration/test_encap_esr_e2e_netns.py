"""The whole chain in namespaces (en, dn1, dn2, esr, server) with the appliance's own
routing: the DNs and the ESR share the EN-DN mapping table (a Redis over a unix
socket), the ``esr`` route agent in the esr namespace installs the routes, and the
DNs use per-EN keys (address tickets).  The esr namespace's routes are read with
pyroute2 at each step: the home slices via their DNs at start, the EN's /32 via the
survivor after its primary DN is killed (kill -9 + link down) during a 100 packets/s
ping, and back to the slice alone once the DN returns and the EN moves home (soft
handoff: not one echo of a 100 packets/s ping lost to the move)."""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest

from services.encap.routes import PROTO_ESR
from tests.support.encap_lab import DN_ADDR, SERVER, SUBNET, EncapLab
from tests.support.netns import Lab
from tests.support.require import require_binary, require_root

pytest_plugins = ["tests.support.netns"]
pytestmark = pytest.mark.integration


def esr_routes(ipr) -> dict[str, str | None]:
    """{prefix: gateway} of the agent's routes (proto 0xe5) in the esr main table."""
    out = {}
    for m in ipr.get_routes(family=socket.AF_INET, table=254):
        if m["type"] == 1 and m["proto"] == PROTO_ESR:
            out[f"{m.get('RTA_DST')}/{m['dst_len']}"] = m.get("RTA_GATEWAY")
    return out


def routes_become(ipr, predicate, what: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        routes = esr_routes(ipr)
        if predicate(routes):
            return routes
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: the ESR has {routes}")
        time.sleep(0.05)


def test_esr_agent_routes_follow_a_dn_failure_and_return(netns_lab: Lab, tmp_path):
    require_root()
    require_binary("redis-server")
    from pyroute2 import IPRoute
    lab = netns_lab
    el = EncapLab(lab, tmp_path, routing="esr").build()
    ipr = None
    try:
        el.start_esr()
        el.start_dn("dn1")
        el.start_dn("dn2")
        el.start_en()
        st = el.wait_en(lambda s: s.get("configured") and s.get("confirmed"), what="address")
        address, primary = st["address"], st["primary"]
        other = "dn2" if primary == "dn1" else "dn1"
        ipr = IPRoute(netns=lab.ns_name("esr"), flags=0)
        # every home slice (/26) via its own DN, nothing else
        slices = {str(n): DN_ADDR[dn] for dn in ("dn1", "dn2")
                  for n in ipaddress.ip_network(SUBNET[dn]).subnets(new_prefix=26)}
        routes_become(ipr, lambda r: r == slices, "home slices")
        ping = lab.run("en", "ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER, check=False)
        assert " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr

        pinger = lab.popen("en", "ping", "-i", "0.01", "-c", "300", "-W", "1", SERVER)
        time.sleep(1.0)
        el.kill_dn(primary)
        # the EN's /32 via the survivor (the dead DN's slices stay: nobody withdrew them,
        # and the /32 is longer)
        routes_become(ipr, lambda r: r.get(f"{address}/32") == DN_ADDR[other],
                      "the EN's /32 via the survivor")
        out, _ = pinger.communicate(timeout=30)
        text = out.decode()
        assert "300 packets transmitted" in text, text
        received = int(text.split(" received")[0].split()[-1])
        assert received >= 200, f"only {received} of 300 echoes at 100 packets/s"
        assert el.en_status()["primary"] == other

        # the move home with soft handoff loses nothing (make-before-break both ways: the
        # EN sends on both DNs until home confirms, dn2 keeps its route and forwards
        # until the ESR has switched)
        pinger = lab.popen("en", "ping", "-i", "0.01", "-c", "400", "-W", "2", SERVER)
        time.sleep(0.5)
        el.revive_dn(primary)
        el.wait_en(lambda s: s.get("primary") == primary and s.get("confirmed"), timeout=30,
                   what="EN back home")
        out, _ = pinger.communicate(timeout=30)
        text = out.decode()
        assert "400 packets transmitted, 400 received" in text, (
            text[-300:], el.en_status().get("events"), el.en_status().get("stats"))
        routes_become(ipr, lambda r: r == slices, "back to the home slices alone")
        ping = lab.run("en", "ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER, check=False)
        assert " 0% packet loss" in ping.stdout, ping.stdout
        # per-EN keys all along: the EN's address claims carried a valid ticket
        for dn in ("dn1", "dn2"):
            drops = el.rpc(dn, "encap.stats")["drops"]
            assert "address_not_yours" not in drops and "unknown_en" not in drops, (dn, drops)
    finally:
        if ipr is not None:
            ipr.close()
        el.close()
