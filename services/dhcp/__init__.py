"""DHCP services: ``v4`` (the ``dhcp4`` service key) and ``v6`` (``dhcp6``).

Each version lives in its own subpackage; the failover logic they share sits
next to them. Nothing here imports a sibling service.
"""
