"""The ``[services.sip]`` table, read with :class:`appliance.config.Table`.

Example (see ``etc/sip.toml``)::

    [services.sip]
    listen_address = "127.0.0.1"        # UDP (and default) listener address; "0.0.0.0" = all
    port = 15060                        # UDP port (0 = no UDP)
    tcp = "tcp:15060:interface=127.0.0.1"   # optional stream listeners: Twisted
    tls = "ssl:15061:interface=127.0.0.1:privateKey=key.pem:certKey=cert.pem"  # endpoint strings
    domains = ["example.test"]          # served domains; empty = any
    default_expires = 3600              # when neither Expires nor expires= is given
    min_expires = 60                    # below it (and not 0): 423 Interval Too Brief
    max_expires = 7200                  # longer requests are shortened to this
    max_contacts = 10                   # bindings per AOR (more: 503)
    receive_buffer_bytes = 4194304      # SO_RCVBUF of the UDP socket
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.sip.registrar import Limits

_DOMAIN = re.compile(r"^[A-Za-z0-9.\-]{1,253}(:\d{1,5})?$")


@dataclass(frozen=True)
class SIPConfig:
    listen_address: object            # ipaddress.IPv4Address | IPv6Address
    port: int
    tcp: str | None
    tls: str | None
    domains: tuple[str, ...]
    limits: Limits
    receive_buffer_bytes: int = 4 * 1024 * 1024
    sweep_interval_s: float = 5.0
    server_header: str = "appliance-sip"


def parse(table, context) -> SIPConfig | None:
    """Validate ``table``; return None after recording problems."""
    before = len(table.problems.items)
    listen_address = table.ip("listen_address", "127.0.0.1")
    if isinstance(listen_address, str):
        import ipaddress
        listen_address = ipaddress.ip_address(listen_address)
    port = table.int("port", 5060, min=0, max=65535)
    tcp = table.endpoint("tcp", None)
    tls = table.endpoint("tls", None, tls_in_string=True)
    if tls is not None and not tls.startswith("ssl:"):
        table.error("tls", f'"{tls}" is not an ssl: endpoint (e.g. "ssl:5061:privateKey=key.pem")')
    domains = []
    for i, d in enumerate(table.list("domains", default=[]) or ()):
        path = f"{table.key_path('domains')}[{i}]"
        if not isinstance(d, str) or not _DOMAIN.match(d):
            table.problems.add(path, f"{d!r} is not a domain name")
        else:
            domains.append(d.lower())
    default_expires = table.int("default_expires", 3600, min=1, max=2 ** 31 - 1)
    min_expires = table.int("min_expires", 60, min=0, max=2 ** 31 - 1)
    max_expires = table.int("max_expires", 7200, min=1, max=2 ** 31 - 1)
    max_contacts = table.int("max_contacts", 10, min=1, max=1000)
    rcvbuf = table.int("receive_buffer_bytes", 4 * 1024 * 1024, min=0, max=1 << 30)
    sweep = table.float("sweep_interval_s", 5.0, min=0.1, max=3600)
    if None not in (min_expires, max_expires) and max_expires < min_expires:
        table.error("max_expires", f"{max_expires} is below min_expires {min_expires}")
    if None not in (default_expires, max_expires) and default_expires > max_expires:
        table.error("default_expires", f"{default_expires} is above max_expires {max_expires}")
    if port == 0 and tcp is None and tls is None:
        table.error("port", "0 (no UDP) needs a tcp or tls listener")
    if len(table.problems.items) != before:
        return None
    return SIPConfig(listen_address, port, tcp, tls, tuple(domains),
                     Limits(default_expires, min_expires, max_expires, max_contacts),
                     rcvbuf, sweep)
