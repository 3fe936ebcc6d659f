"""Redis URLs: parse ``redis://`` / ``unix://`` URLs, mask passwords, escape globs.

Shared by the Redis store (runtime) and the config checker (``--check``), so
both accept and refuse the same URLs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

__all__ = ["glob_escape", "mask_url", "parse_redis_url"]


def glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so ``text`` matches literally."""
    out = []
    for ch in text:
        if ch in "*?[]\\":
            out.append("\\")
        out.append(ch)
    return "".join(out)


def parse_redis_url(url: str) -> dict[str, Any]:
    """``redis://[[user]:password@]host[:port][/db]`` or ``unix:///path?db=N&password=P``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = parse_qs(parts.query)
    info: dict[str, Any] = {"username": None, "password": None, "db": 0}
    if parts.username:
        info["username"] = unquote(parts.username)
    if parts.password is not None:
        info["password"] = unquote(parts.password)
    if scheme == "redis":
        info["host"] = parts.hostname or "127.0.0.1"
        try:
            info["port"] = parts.port or 6379
        except ValueError as e:
            raise ValueError(f"bad redis url {mask_url(url)!r}: {e}") from None
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"bad redis url {mask_url(url)!r}: db must be a number")
            info["db"] = int(path)
    elif scheme in ("unix", "redis+unix"):
        if not parts.path:
            raise ValueError(f"bad redis url {mask_url(url)!r}: no socket path")
        info["path"] = parts.path
    else:
        raise ValueError(f"bad redis url {mask_url(url)!r}: scheme must be redis:// or unix://")
    if "db" in query:
        try:
            info["db"] = int(query["db"][0])
        except ValueError:
            raise ValueError(f"bad redis url {mask_url(url)!r}: db must be a number") from None
    if "password" in query:
        info["password"] = query["password"][0]
    return info


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None and "password=" not in parts.query:
            return url
        netloc = parts.netloc
        if "@" in netloc:
            cred, host = netloc.rsplit("@", 1)
            user = cred.split(":", 1)[0]
            netloc = f"{user}:***@{host}" if ":" in cred else f"{cred}@{host}"
        query = parts.query
        if "password=" in query:
            query = "&".join("password=***" if q.startswith("password=") else q
                             for q in query.split("&"))
        out = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        scheme = parts.scheme + "://"
        if url.startswith(scheme) and not out.startswith(scheme):   # unix:///path
            out = scheme + out[len(parts.scheme) + 1:]
        return out
    except Exception:
        return "<unparsable url>"


