"""The ``dns`` service: a low-TTL DNS updater that follows failover, and DDNS for DHCP.

RFC 2136 dynamic updates signed with TSIG (RFC 8945) keep records (A, AAAA,
SRV, ILNP NID/L64/L32/LP) pointed at the node that currently owns the
resource they are bound to.  Modules:

- :mod:`.records`  desired state from ownership (pure)
- :mod:`.tsigkey`  BIND key-file parser (pure)
- :mod:`.message`  UPDATE / query building and response classification (pure)
- :mod:`.backoff`  retry delays with jitter (pure)
- :mod:`.client`   Twisted UDP/TCP DNS client with server fail-over (I/O)
- :mod:`.updater`  one UPDATE per zone with the epoch guard (I/O through the client)
- :mod:`.ddns`     RFC 4703 DDNS for DHCP leases
- :mod:`.service`  the Twisted service: listeners, reconcile, RPC, metrics
- :mod:`.plugin`   config parsing and the ``dns`` service plugin
"""
