"""Errors the cluster core raises for operator actions: an
:class:`appliance.errors.OperatorError`, which the admin layer's JSON-RPC
dispatcher maps to an application error (the cluster imports no admin code)."""

from __future__ import annotations

from appliance.errors import OperatorError


class ClusterError(OperatorError):
    """An operator request the cluster refuses; ``code`` is the RPC error code."""

    def __init__(self, message: str, code: int):
        super().__init__(message, code)
