"""The ``dhcp4`` service: DHCPv4 server (RFC 2131/2132) with split-scope pools
and lazy-update failover.

``codec`` is the pure wire format (no sockets, no Twisted); pools, leases and
the server protocol build on it.
"""
