"""What the test helpers for real servers (redis-server, named, slapd) share."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time


class ServerProcess:
    """Mixin: needs ``self.proc`` (a Popen or None) and ``self.log_path``."""

    proc = None
    log_path = None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except (OSError, AttributeError):
            return "(no log)"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (a crash: no goodbye to its clients) and reap it."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class DirServerProcess(ServerProcess):
    """Mixin for a server kept in its own directory (named, slapd): also needs
    ``self._logfh`` (the open log or None), ``self.dir``, ``self._own_dir``
    (remove the directory in cleanup) and ``start(timeout)``."""

    _logfh = None
    restart_pause = 0.1

    def _launch(self, argv: list[str], timeout: float):
        """Start ``argv`` in ``self.dir`` logging to ``self.log_path``; wait until
        ``self.wait_ready(timeout)`` passes (killing it if it does not)."""
        self._close_log()
        self._logfh = open(self.log_path, "a")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._logfh,
                                     stderr=subprocess.STDOUT, cwd=self.dir)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL (a crash) and reap; the directory stays for a restart."""
        super().kill()
        self._close_log()

    def _close_log(self) -> None:
        if self._logfh is not None:
            self._logfh.close()
            self._logfh = None

    def stop(self) -> None:
        """Terminate (SIGTERM + wait, then SIGKILL); the directory stays."""
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def restart(self, timeout: float = 10.0):
        """Start again on the same port (stopping a running instance first)."""
        self.stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.start(timeout=max(2.0, deadline - time.monotonic()))
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(self.restart_pause)

    def cleanup(self) -> None:
        """Stop and remove the directory (when it was created here)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()
