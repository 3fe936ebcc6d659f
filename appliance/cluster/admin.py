"""The cluster's operator surface: JSON-RPC methods, ``cluster.status`` and the
Prometheus collector.  Refusals from the core (:class:`ClusterError`, an
:class:`appliance.errors.OperatorError`) become JSON-RPC application errors
in the admin layer's dispatcher: the cluster imports no admin code.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from appliance.cluster.heartbeat import DROP_REASONS


def _rpc(method):
    """``method`` as an RPC method: a :class:`ClusterError` it raises (or its
    Deferred fails with) is an :class:`appliance.errors.OperatorError`, which
    the admin layer's dispatcher turns into an application error with its
    code -- no admin import here."""
    return method


def register_methods(m, rpc) -> None:
    rpc.register("cluster.status", m.status, doc="Peers, resources, partner states.")
    rpc.register("cluster.promote", _rpc(m.promote), doc="Take a resource now {resource}.")
    rpc.register("cluster.demote", _rpc(m.demote), doc="Hand a resource to a peer {resource}.")
    rpc.register("cluster.maintenance", _rpc(m.set_maintenance),
                 doc="{on}: hand everything to the partner and stop claiming.")
    rpc.register("cluster.partner_down", _rpc(m.partner_down),
                 doc="{peer}: declare a silent peer down (serve everything).")
    rpc.register("cluster.reload_keys", _rpc(m.reload_keys),
                 doc="Re-read auth_key_file / previous_auth_key_file and the TLS "
                     "certificates (key rotation without a restart).")


def status(m) -> dict[str, Any]:
    now = m.clock.seconds()
    peers = m.detector.status(now)
    partners = m.partnerships.states()
    for pid, entry in peers.items():
        p = m.peers[pid]
        entry["state"] = partners.get(pid) or ("alive" if p.alive else "dead")
        if pid in partners:
            ps = m.partners[pid]
            entry["partner_confirmed"] = m.partnerships.confirmed(pid)
            entry["partner_reason"] = ps.reason
            if entry["partner_confirmed"]:
                entry["partner_confirmed_by"] = ps.confirmed_by
            if ps.uses_link:
                entry["partner_link"] = ps.fsm.link
            if pid in m.partnerships.evidence:
                n, at = m.partnerships.evidence[pid]
                entry["unanswered_clients"] = n
                entry["unanswered_reported_s"] = round(now - at, 3)
        entry["unechoed"] = m.verifier.unechoed.get(pid, 0) if m.verifier else 0
        paths = m.channel.path_status(pid, now) if m.channel is not None else None
        if paths is not None:
            entry["paths"] = paths          # several heartbeat addresses: per path
    warnings = []
    if (m.cfg is not None and m.cfg.auto_partner_down_s > 0 and partners and m.witness_id is None
            and getattr(m, "lease", None) is None):
        warnings.append(
            f"auto_partner_down_s = {m.cfg.auto_partner_down_s:g} without a witness: automatic "
            "partner-down then depends on client evidence only (partner_down_min_clients = "
            f"{m.partnerships.min_clients()} unanswered clients of the partner, reported by the "
            "service); silence alone never triggers it")
    from appliance.cluster.keys import CERT_WARN_DAYS
    for what, info in sorted(getattr(m, "certs", {}).items()):
        days = info.get("days_left")
        if info.get("error"):
            warnings.append(f"peer-link {what} {info['file']} unreadable: {info['error']}")
        elif days is not None and days < CERT_WARN_DAYS:
            warnings.append(f"peer-link {what} {info['file']} expires in {days:g} days "
                            f"({info['not_after']}): renew it (appliance-keys) and run "
                            "cluster.reload_keys / restart")
    from appliance.cluster.detector import election_fallbacks
    for name in election_fallbacks(m):
        differ = sorted(pid for pid, p in m.peers.items() if p.alive and any(
            k in ("priority", "preempt") for k in p.config_mismatch.get(name, ())))
        warnings.append(f"resource {name}: priority/preempt differ from {', '.join(differ)}: "
                        "elected by the config-independent rule (current owner keeps it, else "
                        "the largest node id) until the configs agree")
    quorum = {"has": m.has_quorum(), "witness": m.witness_id,
              "witness_vote": (m.peers[m.witness_id].heartbeat.vote
                               if m.witness_id and m.peers[m.witness_id].heartbeat else None)}
    if getattr(m, "lease", None) is not None:
        quorum["lease"] = m.lease.status()          # Redis owner leases
    if m.is_witness:
        quorum = {"role": "witness", "vote": m.vote}
    fencer = getattr(m, "fencer", None)
    if fencer is not None:
        for pid, st in fencer.peers.items():
            if st.state == "failed":
                warnings.append(f"fencing {pid} failed ({st.error}): its resources are not "
                                "taken over until pre_takeover succeeds")
    return {"node": m.node_id, "incarnation": m.incarnation, "warnings": warnings,
            "quorum": quorum,
            "heartbeat": {"interval_ms": round(m.interval * 1000),
                          "beats_per_interval": m.beats,
                          "deadline_ms": round(m.deadline_s * 1000, 1),
                          "late_beats": m.stats["late_beats"],
                          # suspicions put off because this node itself was stalled
                          "stall_deferred": m.detector.stall_deferred},
            "maintenance": m.maintenance, "health": list(m.health_flags()),
            "heartbeat_interval_ms": round(m.interval * 1000),
            "peers": peers, "resources": m.table.status(now),
            "partners": partners,
            "drops": dict(m.verifier.drops) if m.verifier else {},
            "peer_link": m.peerlink.status() if m.peerlink is not None else None,
            "tls": dict(getattr(m, "certs", {})),
            "keys": {"previous_keys": len(m.verifier.previous_keys) if m.verifier else 0,
                     "accepted_by_key": dict(m.verifier.accepted_by_key) if m.verifier else {}},
            "stats": dict(m.stats),
            "gateway": (m.gateway.status() if getattr(m, "gateway", None) is not None
                        else None),
            "fencing": (None if fencer is None else
                        {"command": list(fencer.command), "timeout_s": fencer.timeout_s,
                         "peers": fencer.status(now), **fencer.stats})}


def collect(m):
    sent = CounterMetricFamily("appliance_heartbeats_sent", "Heartbeats sent")
    sent.add_metric([], m.stats["sent"])
    yield sent
    recv = CounterMetricFamily("appliance_heartbeats_received", "Heartbeats accepted")
    recv.add_metric([], m.stats["received"])
    yield recv
    drops = CounterMetricFamily("appliance_heartbeats_dropped",
                                "Heartbeats dropped, by reason", labels=["reason"])
    counts = m.verifier.drops if m.verifier else {}
    for reason in DROP_REASONS:
        drops.add_metric([reason], counts.get(reason, 0))
    yield drops
    alive = GaugeMetricFamily("appliance_peer_alive", "1 if the peer is heard", labels=["peer"])
    lost = CounterMetricFamily("appliance_heartbeats_lost",
                               "Heartbeats missing from the peer's sequence", labels=["peer"])
    loss = GaugeMetricFamily("appliance_heartbeat_loss_ratio",
                             "Smoothed share of the peer's heartbeats lost", labels=["peer"])
    jitter = GaugeMetricFamily("appliance_heartbeat_jitter_seconds",
                               "Smoothed heartbeat arrival jitter", labels=["peer"])
    suspected = CounterMetricFamily("appliance_peer_suspicions",
                                    "Times the detector declared the peer dead", labels=["peer"])
    for p in m.peers.values():
        alive.add_metric([p.id], 1 if p.alive else 0)
        lost.add_metric([p.id], p.lost)
        loss.add_metric([p.id], p.loss_ewma)
        jitter.add_metric([p.id], p.jitter_s)
        suspected.add_metric([p.id], p.suspected)
    yield alive
    yield lost
    yield loss
    yield jitter
    yield suspected
    changes = CounterMetricFamily("appliance_failovers", "Ownership changes on this node")
    changes.add_metric([], m.stats["role_changes"])
    yield changes
    owner = GaugeMetricFamily("appliance_resource_owner", "1 if this node owns the resource",
                              labels=["resource"])
    for name, res in m.resources.items():
        owner.add_metric([name], 1 if res.mine else 0)
    yield owner
    certs = GaugeMetricFamily("appliance_cluster_cert_expiry_days",
                              "Days until the peer-link certificate (cert) or CA expires",
                              labels=["which"])
    for what, info in sorted(getattr(m, "certs", {}).items()):
        if info.get("days_left") is not None:
            certs.add_metric([what], info["days_left"])
    yield certs
    if m.verifier is not None:
        by_key = CounterMetricFamily("appliance_heartbeats_accepted_by_key",
                                     "Heartbeats accepted, by the key that signed them "
                                     "(previous: during a key rotation)", labels=["key"])
        for which, n in sorted(m.verifier.accepted_by_key.items()):
            by_key.add_metric([which], n)
        yield by_key
    if m.peerlink is not None:
        parked = CounterMetricFamily("appliance_peerlink_parked",
                                     "Peer-link messages parked after repeated handler failures")
        parked.add_metric([], m.peerlink.stats.get("parked", 0))
        yield parked
