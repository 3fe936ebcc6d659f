"""Retry delays (services.dns.backoff)."""

from __future__ import annotations

import pytest

from services.dns.backoff import Backoff


def test_grows_exponentially_to_the_cap_and_resets():
    """Without jitter: 0.5, 1, 2, 4, then capped at 5; reset starts over."""
    b = Backoff(0.5, 5.0, jitter=0.0)
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    b.reset()
    assert b.next_delay() == 0.5


def test_jitter_spreads_within_bounds():
    """Jitter 0.2 keeps each delay within +/-20 % of the base (and under the cap)."""
    lo = Backoff(1.0, 100.0, jitter=0.2, rng=lambda: 0.0)
    hi = Backoff(1.0, 100.0, jitter=0.2, rng=lambda: 0.999999)
    assert lo.next_delay() == pytest.approx(0.8)
    assert hi.next_delay() == pytest.approx(1.2, rel=1e-5)
    capped = Backoff(1.0, 1.0, jitter=0.2, rng=lambda: 0.999999)
    assert capped.next_delay() <= 1.0


def test_rejects_nonsense():
    """Parameters that would never retry or retry backwards are refused."""
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)
