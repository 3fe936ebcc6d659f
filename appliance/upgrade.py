"""``appliancectl upgrade-check``: is this node ready for the next step of a rolling upgrade?

The procedure (README "Rolling upgrade"), one node at a time::

    appliancectl maintenance on
    appliancectl upgrade-check --wait 60            # safe to stop: the partner serves
    systemctl stop appliance; <install the new version>; systemctl start appliance
    appliancectl upgrade-check --rejoined --wait 120 # back: partners NORMAL, caught up
    appliancectl maintenance off

Phase ``stop`` (the default) passes when this node is in maintenance, owns no resource,
hears every peer, and owes no peer anything (peer-link backlog 0, SIP replication
backlog 0): stopping it then takes nothing from the clients.  Phase ``rejoined`` passes
when every peer is heard, every partner relationship (and dhcp4's own failover state)
is NORMAL, the peer link is up
with nothing owed either way, SIP replication has caught up, and no heartbeat was
dropped for its wire version (a peer more than one release apart).

The checks are a pure function of the node's ``cluster.status``, ``sip.stats`` and
``dhcp4.scopes`` answers (None: no such service on the node), so they work against the
previous release too.  ``rejoined`` also waits for the dhcp4 service's own failover
state to be NORMAL (it can lag the cluster's partner state while it catches up).
"""

from __future__ import annotations

from typing import Any

PHASES = ("stop", "rejoined")


def checks(phase: str, cluster: dict[str, Any], sip: dict[str, Any] | None,
           dhcp4: dict[str, Any] | None = None) -> list[tuple[str, bool, str]]:
    """``[(check, ok, detail)]`` for ``phase`` (``dhcp4``: the ``dhcp4.scopes``
    answer, None without dhcp4)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    out: list[tuple[str, bool, str]] = []
    node = cluster.get("node")
    peers = cluster.get("peers") or {}
    link = cluster.get("peer_link") or {}
    partners = cluster.get("partners") or {}

    if phase == "stop":
        on = bool(cluster.get("maintenance"))
        out.append(("maintenance", on, "on" if on else
                    "off: run `appliancectl maintenance on` first"))
        owned = sorted(name for name, r in (cluster.get("resources") or {}).items()
                       if r.get("owner") == node)
        out.append(("owns nothing", not owned,
                    "the partner holds every resource" if not owned
                    else f"still owns {', '.join(owned)}"))

    dead = sorted(pid for pid, p in peers.items() if not p.get("alive"))
    out.append(("peers heard", not dead and bool(peers),
                "no peers configured" if not peers else
                (f"{len(peers)} alive" if not dead else f"not heard: {', '.join(dead)}")))

    for pid, p in sorted(link.items()):
        ok = bool(p.get("connected")) and not p.get("backlog") and not p.get("inbox")
        detail = (f"connected, nothing owed (peer speaks v{p['version']})"
                  if ok and p.get("version") is not None else
                  "connected, nothing owed" if ok else
                  f"connected={p.get('connected')} backlog={p.get('backlog')} "
                  f"inbox={p.get('inbox')}")
        out.append((f"peer link {pid}", ok, detail))

    if phase == "rejoined":
        not_normal = {pid: s for pid, s in partners.items() if s != "NORMAL"}
        out.append(("partners NORMAL", not not_normal,
                    "all NORMAL" if not not_normal and partners else
                    "no partner relationships" if not partners else
                    ", ".join(f"{pid}: {s}" for pid, s in sorted(not_normal.items()))))
        bad = (cluster.get("drops") or {}).get("bad_version", 0)
        out.append(("wire versions", not bad,
                    "every beat readable" if not bad else
                    f"{bad} heartbeats dropped for their version: a peer more than one "
                    "release apart (upgrade one release at a time)"))

    failover = (dhcp4 or {}).get("failover")
    if phase == "rejoined" and failover:
        # the service's own view: it may stay COMMUNICATIONS-INTERRUPTED after the
        # cluster's partner state is NORMAL, until it caught up with the partner
        state = failover.get("state")
        out.append(("dhcp4 failover", state == "NORMAL",
                    f"{state} with {failover.get('peer')}"))

    if sip is not None:
        repl = sip.get("replication") or {}
        backlog = repl.get("backlog") or {}
        resync = repl.get("full_resync_needed") or {}
        known = repl.get("peer_bindings") or {}
        owed = {pid: n for pid, n in backlog.items() if n}
        pending = sorted(pid for pid, v in resync.items() if v)
        if phase == "rejoined":
            pending += sorted(pid for pid in backlog if known.get(pid) is None
                              and pid not in pending)
        ok = not owed and not pending
        out.append(("sip replication", ok, "caught up" if ok else
                    "; ".join([f"backlog to {pid}: {n}" for pid, n in sorted(owed.items())]
                              + [f"not synced with {pid}" for pid in pending])))
    return out


def render(phase: str, results: list[tuple[str, bool, str]]) -> str:
    width = max((len(name) for name, _, _ in results), default=0)
    lines = [f"{'ok  ' if ok else 'WAIT'}  {name.ljust(width)}  {detail}"
             for name, ok, detail in results]
    ready = all(ok for _, ok, _ in results)
    verdict = {"stop": "safe to stop this node", "rejoined": "rejoined"}[phase]
    lines.append(verdict if ready else f"not yet: {phase}")
    return "\n".join(lines)
