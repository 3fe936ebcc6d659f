"""Reading Twisted server endpoint strings without binding anything (pure).

Used by the admin service (to build a mutual-TLS listener from an ``ssl:``
string) and by ``appliancectl`` (to turn the node's ``admin.listen`` into the
URL it should call).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import quote

__all__ = ["split_endpoint", "admin_url", "EndpointError"]


class EndpointError(ValueError):
    """The endpoint string cannot be used for this purpose (message says why)."""


def split_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """Split ``kind:arg:key=value...`` like Twisted does (``\\`` escapes ``:`` and ``=``).

    >>> split_endpoint(r"ssl:8740:interface=127.0.0.1:privateKey=a\\:b.pem")
    ('ssl', ['8740'], {'interface': '127.0.0.1', 'privateKey': 'a:b.pem'})
    """
    parts: list[list[str]] = [[""]]     # each part: [key-or-value] or [key, value]
    escaped = False
    for ch in description:
        if escaped:
            parts[-1][-1] += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append([""])
        elif ch == "=" and len(parts[-1]) == 1:
            parts[-1].append("")
        else:
            parts[-1][-1] += ch
    kind_part = parts[0]
    if len(kind_part) != 1 or not kind_part[0]:
        raise EndpointError(f"{description!r}: missing endpoint type")
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in parts[1:]:
        if len(part) == 1:
            args.append(part[0])
        else:
            kwargs[part[0]] = part[1]
    return kind_part[0], args, kwargs


def _port(description: str, args: list[str], kwargs: dict[str, str]) -> int:
    value = kwargs.get("port", args[0] if args else None)
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise EndpointError(f"{description!r}: no port number") from None
    if not 0 < port < 65536:
        raise EndpointError(f"{description!r}: port {port} cannot be connected to")
    return port


def _client_host(interface: str | None, ipv6: bool) -> str:
    """The address a local client should dial for a listener bound to ``interface``."""
    if not interface:
        return "::1" if ipv6 else "127.0.0.1"
    try:
        addr = ipaddress.ip_address(interface)
    except ValueError:
        return interface    # a host name
    if addr.is_unspecified:
        return "::1" if addr.version == 6 else "127.0.0.1"
    return str(addr)


def admin_url(listen: str, path: str = "/rpc") -> str:
    """The URL of ``path`` on an admin listener described by ``listen``.

    ``tcp:8740:interface=10.0.0.1`` -> ``http://10.0.0.1:8740/rpc``; no
    interface, ``0.0.0.0`` or ``::`` -> loopback; ``ssl:`` -> ``https://``;
    ``unix:/run/a.sock`` -> ``http+unix://%2Frun%2Fa.sock/rpc`` (understood by
    appliancectl).  Raises :class:`EndpointError` for other kinds.
    """
    kind, args, kwargs = split_endpoint(listen)
    if kind == "unix":
        address = kwargs.get("address", args[0] if args else None)
        if not address:
            raise EndpointError(f"{listen!r}: no socket path")
        return f"http+unix://{quote(address, safe='')}{path}"
    if kind not in ("tcp", "tcp6", "ssl"):
        raise EndpointError(f"cannot derive an admin URL from {listen!r} "
                            f"(endpoint type {kind!r}); use --url")
    port = _port(listen, args, kwargs)
    host = _client_host(kwargs.get("interface"), kind == "tcp6")
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if kind == "ssl" else "http"
    return f"{scheme}://{host}:{port}{path}"
