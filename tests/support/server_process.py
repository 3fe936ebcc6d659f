"""What the test helpers for real servers (redis-server, named) share."""

from __future__ import annotations

import os
import signal


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
