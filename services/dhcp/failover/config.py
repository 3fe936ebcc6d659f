"""The ``failover = {...}`` table of a DHCP service (dhcp4, dhcp6): the
partner relationship's settings, parsed with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config import ParseContext, Table

MODES = ("split-scope", "load-balancing", "hot-standby")
ROLES = ("primary", "secondary")

__all__ = ["Failover", "MODES", "ROLES", "parse_failover"]


@dataclass(frozen=True)
class Failover:
    """``failover = {...}``: the partner relationship of this node."""

    peer: str
    role: str                 # "primary" | "secondary"
    mode: str = "split-scope"  # one of MODES
    split: int = 50           # primary's percent (0..100)
    delay_s: float = 2.0      # non-owner answers once the client's secs >= delay_s
    mclt_s: int = 3600        # maximum client lead time
    max_unacked: int = 1000   # bound on un-acked lease updates to the partner
    #: COMMUNICATIONS-INTERRUPTED: a partner's client whose DISCOVER/REQUEST has
    #: ``secs >= max_ack_delay_s`` counts as unanswered (evidence for the cluster,
    #: as Kea's max-ack-delay)
    max_ack_delay_s: float = 10.0

    @property
    def partner_role(self) -> str:
        return "secondary" if self.role == "primary" else "primary"



def parse_failover(table: Table, context: ParseContext,
                   modes: tuple[str, ...] = MODES) -> Failover | None:
    """``failover = {...}`` of a DHCP service's table (errors name the key);
    ``modes``: the modes this service offers (dhcp6: no load balancing)."""
    ft = table.table("failover")
    if ft is None:
        return None
    peer = ft.str("peer")
    role = ft.str("role", choices=ROLES + ("standby",))
    mode = ft.str("mode", "split-scope", choices=modes)
    split = ft.int("split", 50, min=0, max=100)
    delay_s = ft.float("delay_s", 2.0, min=0, max=3600)
    mclt_s = ft.int("mclt_s", 3600, min=1, max=30 * 86400)
    max_unacked = ft.int("max_unacked", 1000, min=1, max=1_000_000)
    max_ack_delay_s = ft.float("max_ack_delay_s", 10.0, min=1, max=65535)
    ft.done()
    if peer is not None and peer not in context.peer_ids:
        known = ", ".join(context.peer_ids) or "none: [cluster] has no peers"
        ft.error("peer", f"{peer!r} is not a cluster peer ({known})")
        return None
    if role == "standby":
        if mode is not None and mode != "hot-standby":
            ft.error("role", f'"standby" is only a role in mode "hot-standby", not {mode!r}')
            return None
        role = "secondary"
    if None in (peer, role, mode, split, delay_s, mclt_s, max_unacked, max_ack_delay_s):
        return None
    return Failover(peer, role, mode, split, float(delay_s), mclt_s, max_unacked,
                    float(max_ack_delay_s))
