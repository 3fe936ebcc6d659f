"""The shared state store: one contract (:class:`IStateStore`), two backends."""

from appliance.store.interface import (
    IStateStore,
    StoreError,
    StoreUnavailable,
    Op,
)

__all__ = ["IStateStore", "StoreError", "StoreUnavailable", "Op"]
