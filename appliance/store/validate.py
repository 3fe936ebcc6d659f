"""Argument checks every store backend shares (the boundary of the contract).

``check_str`` refuses what the contract refuses: anything that is not a
``str``, and strings that do not encode as UTF-8 (a lone surrogate such as
``"\\ud800"``, easy to get from ``json.loads('"\\\\ud800"')`` or from
``surrogateescape`` decoding).  It raises :class:`StoreError`; the store
methods turn that into an errback, never a synchronous raise.
"""

from __future__ import annotations

from appliance.store.interface import StoreError

__all__ = ["check_str", "encodable"]


def encodable(value: str) -> bool:
    """True if ``value`` (a str) encodes as UTF-8."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_str(*values) -> None:
    """Raise :class:`StoreError` unless every value is a UTF-8-encodable ``str``."""
    for v in values:
        if type(v) is not str and not isinstance(v, str):
            raise StoreError(f"keys, fields and values must be str, not {type(v).__name__}")
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise StoreError(f"string does not encode as UTF-8 "
                                 f"({e.reason} at {e.start}): {v[:40]!r}") from None
