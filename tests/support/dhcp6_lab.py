"""Helpers of the dhcp6 integration tests: a private ``dhclient -6`` and lease-table checks.

:class:`Dhclient` runs Debian's ``dhclient -6 -N -P`` (an address and a delegated
prefix) in a namespace of a :class:`tests.support.netns.Lab` with its own lease
file, pid file and a hook script that only records what happened (never touches
the namespace's addresses or resolv.conf).  :func:`all_leases` pages through
``dhcp6.leases``; :func:`check_no_duplicates` is the lease-table judge.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.dhcp6_client import overlapping_prefixes


def all_leases(app, node: str = "a", **params) -> list[dict]:
    """Every lease of ``node`` matching ``params``, all pages of ``dhcp6.leases``."""
    out, cursor = [], None
    while True:
        page_params = {"limit": 1000, **params}
        if cursor:
            page_params["cursor"] = cursor
        page = app.rpc(node, "dhcp6.leases", page_params)
        assert page is not None, f"dhcp6.leases failed on {node}\n{app.logs()}"
        out += page["leases"]
        cursor = page.get("cursor")
        if not cursor:
            return out


HOOK = """#!/bin/sh
# dhclient -6 hook: record what happened; never touch the system (no address, no resolv.conf)
echo "$reason|$new_ip6_address|$new_ip6_prefix|$old_ip6_address|$old_ip6_prefix" >> "{out}"
exit 0
"""


class Dhclient:
    """``dhclient -6 -N -P`` with a private lease file, pid file and hook script."""

    def __init__(self, lab, work: Path, iface: str = "eth0"):
        self.lab, self.work, self.iface = lab, work, iface
        self.events = work / "dhclient-events"
        self.hook = work / "dhclient-hook.sh"
        self.hook.write_text(HOOK.format(out=self.events))
        self.hook.chmod(0o755)
        self.leases = work / "dhclient6.leases"
        self.pid = work / "dhclient6.pid"
        self.out = work / "dhclient6.out"
        self.proc = None

    def args(self, *extra: str) -> list[str]:
        return ["dhclient", "-6", "-N", "-P", "-v", *extra, "-sf", str(self.hook),
                "-lf", str(self.leases), "-pf", str(self.pid), self.iface]

    def start(self) -> None:
        """Foreground (``-d``), one try (``-1``): it stays to renew once bound."""
        self.proc = self.lab.popen("client", *self.args("-d", "-1"),
                                   stdout=open(self.out, "w"), stderr=subprocess.STDOUT)

    def release(self) -> subprocess.CompletedProcess:
        """``dhclient -6 -r``: stops the running client (pid file) and sends RELEASE."""
        return self.lab.run("client", *self.args("-r"), check=False, timeout=60)

    def log(self) -> str:
        return self.out.read_text()[-3000:] if self.out.exists() else ""

    def seen(self) -> list[tuple[str, str, str]]:
        """``(reason, address, prefix)`` per hook call (old_* when new_* is empty)."""
        if not self.events.exists():
            return []
        out = []
        for line in self.events.read_text().splitlines():
            reason, new_a, new_p, old_a, old_p = (line.split("|") + [""] * 5)[:5]
            out.append((reason, new_a or old_a, new_p or old_p))
        return out

    def got(self, reasons: tuple[str, ...]) -> tuple[set, set]:
        """Addresses and prefixes reported with any of ``reasons``."""
        ev = [e for e in self.seen() if e[0] in reasons]
        return {e[1] for e in ev if e[1]}, {e[2] for e in ev if e[2]}

    def duid(self) -> str | None:
        """The client's DUID (hex) as its lease file records it."""
        if not self.leases.exists():
            return None
        for line in self.leases.read_text().splitlines():
            line = line.strip()
            if line.startswith("option dhcp6.client-id"):
                octets = line.split()[-1].rstrip(";").split(":")
                return bytes(int(o, 16) for o in octets).hex()
        return None


def check_no_duplicates(na: list[dict], pd: list[dict], *, per_iaid: int = 1) -> None:
    """One DUID per address and per prefix, at most ``per_iaid`` addresses and prefixes
    per DUID+IAID (2 for a pair's merged tables: both partners may have committed one
    rapid-commit SOLICIT, and both bindings run to their expiry since adcf66b), no
    overlapping prefixes."""
    for rows, field in ((na, "address"), (pd, "prefix")):
        holders: dict[str, set] = {}
        held: dict[tuple, set] = {}
        for le in rows:
            holders.setdefault(le[field], set()).add(le["duid"])
            held.setdefault((le["duid"], le["iaid"]), set()).add(le[field])
        shared = {k: v for k, v in holders.items() if len(v) > 1}
        assert not shared, f"{field}es given to two DUIDs: {shared}"
        doubled = {k: v for k, v in held.items() if len(v) > per_iaid}
        assert not doubled, f"DUID+IAIDs holding more than {per_iaid} {field}es: {doubled}"
    by_duid = {f'{le["duid"]}/{le["iaid"]}/{i}': le["prefix"] for i, le in enumerate(pd)}
    assert not overlapping_prefixes(by_duid), overlapping_prefixes(by_duid)[:5]
