"""Generator code that runs at once when nothing has to wait.

``@eager`` turns a generator function written like an ``inlineCallbacks``
one (``x = yield something``) into a function that returns its result
*directly* when every yielded value is a plain value, and a Deferred only
when it has to wait (a yielded Deferred) or fails.  Hot paths whose
lookups are usually answered from memory (the DHCP lease store on the
embedded store) then pay no Deferred, context or generator-trampoline cost,
while the same code still waits properly on a networked store.

Rules for an ``@eager`` function's result ``r``:

* success without waiting: ``r`` is the value itself;
* it waited: ``r`` is a Deferred that fires with the value;
* it raised (at once or later): ``r`` is a failed Deferred -- errors are
  never raised to the caller, so ``as_deferred(f(...))`` or an ``isinstance``
  test is all a caller needs.

Yielding a Deferred hands the generator its result (or throws its failure
in), like ``inlineCallbacks``.  ``as_deferred`` wraps any result for code
that wants a Deferred; callers inside ``inlineCallbacks`` can ``yield`` an
eager result as it is.
"""

from __future__ import annotations

import functools
from types import GeneratorType
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

Deferred = defer.Deferred


def as_deferred(result: Any) -> defer.Deferred:
    """A Deferred for an eager result (a value or a Deferred)."""
    return result if isinstance(result, Deferred) else defer.succeed(result)


def eager(f: Callable) -> Callable:
    """Decorate a generator function: see the module docstring."""

    @functools.wraps(f)
    def run(*args, **kwargs):
        try:
            gen = f(*args, **kwargs)
        except BaseException:
            return defer.fail()
        if not isinstance(gen, GeneratorType):      # a body without a yield
            return gen
        return _drive(gen, None, False, None)

    return run


def _drive(gen, value, failed: bool, out: defer.Deferred | None):
    """Advance ``gen`` until it finishes or yields an unfired wait."""
    while True:
        try:
            if failed:
                failed = False
                yielded = value.throwExceptionIntoGenerator(gen)
            else:
                yielded = gen.send(value)
        except StopIteration as stop:
            if out is None:
                return stop.value
            out.callback(stop.value)
            return out
        except BaseException:
            if out is None:
                return defer.fail()
            out.errback(Failure())
            return out
        if not isinstance(yielded, Deferred):
            value = yielded
            continue
        state: list = [None]               # [Deferred to drive into once async, result?]

        def resume(result, state=state):
            if state[0] is not None:       # fired later: continue from here
                _drive(gen, result, isinstance(result, Failure), state[0])
            else:                          # fired at once: the loop below continues
                state.append(result)
            return None

        yielded.addBoth(resume)
        if len(state) == 1:                # has to wait
            if out is None:
                out = Deferred()
            state[0] = out
            return out
        value = state[1]
        failed = isinstance(value, Failure)
