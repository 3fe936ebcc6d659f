"""Twisted endpoint strings, split with Twisted's own strports lexer.

A neutral home (no admin, no cluster code) for the one helper both the admin
listener (``admin.listen``) and the cluster peer link (``cluster.peer_link``)
need: the cluster layer imports this, never the admin layer.
:mod:`appliance.admin.listen` re-exports both names.
"""

from __future__ import annotations

from twisted.internet import endpoints

__all__ = ["split_endpoint", "EndpointError"]


class EndpointError(ValueError):
    """The endpoint string cannot be used for this purpose (message says why)."""


def split_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """Split ``kind:arg:key=value...`` with Twisted's own strports lexer.

    >>> split_endpoint(r"ssl:8740:interface=127.0.0.1:privateKey=a\\:b.pem")
    ('ssl', ['8740'], {'interface': '127.0.0.1', 'privateKey': 'a:b.pem'})
    """
    if not isinstance(description, str):
        raise EndpointError(f"{description!r}: not a string")
    args, kwargs = endpoints._parse(description)
    if not args or not args[0]:
        raise EndpointError(f"{description!r}: missing endpoint type")
    return args[0], list(args[1:]), dict(kwargs)
