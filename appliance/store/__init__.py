"""The shared state store: one contract (:class:`IStateStore`), two backends."""

from appliance.store.interface import (
    IImmediateStore,
    RESYNC,
    StoreDown,
    IStateStore,
    StoreError,
    StoreUnavailable,
    Op,
)

__all__ = ["IImmediateStore", "RESYNC", "StoreDown", "IStateStore", "StoreError", "StoreUnavailable", "Op"]
