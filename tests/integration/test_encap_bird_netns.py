"""The BIRD 2 variant of route injection (the thesis's setup): BIRD on a DN
learns the kernel route RouteInjector writes (``protocol kernel { learn; }``,
etc/bird/dn.conf), carries it over OSPF, and BIRD on the ESR (etc/bird/esr.conf)
installs it via the DN -- in namespaces the bench module builds and removes.

Runs ``bench.encap_bird`` (the bench's own helper) in a child process with
BIRD's default ``scan time`` (the line stays commented out in etc/bird/dn.conf)
and prints the convergence times."""

from __future__ import annotations

import pytest

from tests.support.require import require_binary, require_root

pytestmark = pytest.mark.integration


def test_bird_carries_dn_routes_to_the_esr():
    """Each injected route appears at the ESR via the DN's address, and goes when
    withdrawn; a route of another protocol on the DN is not carried."""
    require_root()
    require_binary("bird")
    require_binary("birdc")
    from bench.encap_bird import DN_ADDR, run
    result = run("bird", n=3, timeout=240)
    assert result["via"] == DN_ADDR            # the ESR routes the slice to the DN
    assert result["foreign_carried"] is False  # only the encap service's routes (proto 228)
    assert len(result["samples_s"]) == 3 and len(result["withdraw_samples_s"]) == 3
    assert all(s > 0 for s in result["samples_s"])
    print(f"\nBIRD_CONVERGENCE ({result['daemon']}, kernel scan time: default; OSPF hello 1 s, "
          f"tick 1 s): add {[round(s * 1000) for s in result['samples_s']]} ms, withdraw "
          f"{[round(s * 1000) for s in result['withdraw_samples_s']]} ms, adjacency "
          f"{result['adjacency_s']:.1f} s")
