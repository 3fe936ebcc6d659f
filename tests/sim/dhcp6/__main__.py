"""Run the DHCPv6 failover pair simulator (the dhcp4 simulator's command line).

    python -m tests.sim.dhcp6 --seeds 10000        # seeds 0..9999
    python -m tests.sim.dhcp6 --seed 1234 -v       # replay one seed, print its events
"""

from __future__ import annotations

import sys

from tests.sim.dhcp4.__main__ import main
from tests.sim.dhcp6.world import Violation, World

if __name__ == "__main__":
    sys.exit(main(world=World, violation=Violation, prog="python -m tests.sim.dhcp6",
                  duration=90.0))
