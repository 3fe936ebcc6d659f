"""DHCPv6 server (RFC 8415): codec, message handling, leases (IA_NA + IA_PD), service."""
