"""appliance.eager: values at once when nothing waits, Deferreds when something does."""

from __future__ import annotations

from twisted.internet import defer

from appliance.eager import as_deferred, eager
from tests.support.sync import ok


@eager
def add(a, b):
    x = yield a
    y = yield b
    return x + y


@eager
def no_yield(v):
    return v * 2


@eager
def boom(wait):
    yield wait
    raise ValueError("bad")


@eager
def catches(d):
    try:
        yield d
    except KeyError:
        return "caught"
    return "not raised"


def test_plain_values_return_at_once():
    """Nothing to wait for: the result itself, no Deferred; nested eager calls too."""
    assert add(1, 2) == 3
    assert add(add(1, 1), defer.succeed(5)) == 7      # a fired Deferred is read at once
    assert no_yield(4) == 8


def test_waits_on_an_unfired_deferred_and_resumes():
    """An unfired Deferred makes the call return a Deferred that fires with the value."""
    d = defer.Deferred()
    r = add(d, 10)
    assert isinstance(r, defer.Deferred) and not r.called
    d.callback(5)
    assert ok(r) == 15


def test_errors_are_failed_deferreds_at_once_or_later():
    """Raising never escapes to the caller: a failed Deferred, now or later."""
    r = boom(1)
    assert isinstance(r, defer.Deferred)
    fails = []
    r.addErrback(fails.append)
    assert fails and fails[0].check(ValueError)
    d = defer.Deferred()
    r2 = boom(d)
    assert not r2.called
    d.callback(None)
    fails2 = []
    r2.addErrback(fails2.append)
    assert fails2 and fails2[0].check(ValueError)


def test_failure_of_a_yielded_deferred_is_thrown_in():
    """A yielded Deferred's failure is raised inside the generator, fired or not."""
    assert catches(defer.fail(KeyError("k"))) == "caught"
    d = defer.Deferred()
    r = catches(d)
    d.errback(KeyError("later"))
    assert ok(r) == "caught"


def test_as_deferred_wraps_values():
    assert ok(as_deferred(3)) == 3
    d = defer.Deferred()
    assert as_deferred(d) is d
