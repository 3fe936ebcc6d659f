"""appliance.plugin.start_loop / stop_all: the start/stop bookkeeping the encap
service shares (sip's stopService has the same shape: loop, ports, gather)."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from appliance.plugin import start_loop, stop_all


def test_start_loop_runs_on_the_reactor_given_and_logs_its_end():
    clock, calls, events = Clock(), [], []

    def tick():
        calls.append(clock.seconds())
        if len(calls) == 3:
            raise RuntimeError("boom")
    globalLogPublisher.addObserver(events.append)
    try:
        loop = start_loop(clock, 1.0, tick, "test: tick loop")
        clock.pump([1.0] * 5)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert calls == [1.0, 2.0, 3.0] and not loop.running
    assert any(e.get("what") == "test: tick loop" and "log_failure" in e for e in events)


def test_stop_all_stops_loops_ports_and_closers_and_waits_for_them():
    clock = Clock()
    loop = start_loop(clock, 1.0, lambda: None, "test loop")
    slow = defer.Deferred()
    done = []

    class Port:
        def stopListening(self):
            done.append("port")
            return slow

    class Closer:
        def close(self):
            done.append("closer")

    class Broken:
        def close(self):
            raise OSError("already gone")

    d = stop_all(loop, None, Port(), Broken(), Closer())
    assert not loop.running and done == ["port", "closer"]
    fired = []
    d.addCallback(fired.append)
    assert fired == []              # waits for the port
    slow.callback(None)
    assert fired == [None]          # the broken closer's error was logged, not raised
