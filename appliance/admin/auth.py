"""Who may use the admin API: a bearer token kept in a private file.

The token file is created on first start (``secrets.token_urlsafe(32)``, mode
0600, created atomically with ``O_CREAT | O_EXCL`` so it is never readable by
others, not even for an instant).  ``appliancectl`` on the same box reads the
same file.  An existing file that group or others may access is refused
(like ssh refuses such a private key).  Requests carry ``Authorization: Bearer <token>``; the comparison
is constant-time.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from twisted.logger import Logger

__all__ = ["BearerTokenAuth", "AllowAll", "TokenFileError"]


class TokenFileError(Exception):
    """The token file cannot be read or created (the message names it)."""


def _token_from_header(value: bytes | None) -> bytes | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    return token or None


class BearerTokenAuth:
    """Checks ``Authorization: Bearer <token>`` against the token file."""

    _log = Logger()

    def __init__(self, token_file: str | Path):
        self.token_file = Path(token_file)
        self._token: bytes | None = None

    def load_or_create(self) -> str:
        """Read the token, or create the file with a new one; return the token.

        Raises :class:`TokenFileError` with a one-line reason on failure.
        """
        path = self.token_file
        try:
            token = self._read(path)
        except FileNotFoundError:
            token = self._create(path)
        self._token = token.encode("ascii")
        return token

    def _read(self, path: Path) -> str:
        try:
            st = path.stat()
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError) as e:
            raise TokenFileError(f"admin token file {path}: cannot read: "
                                 f"{getattr(e, 'strerror', None) or e}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            # Refused, as ssh refuses a private key others can read: the token
            # may already have leaked, and serving with it would hide that.
            mode = oct(stat.S_IMODE(st.st_mode))
            raise TokenFileError(f"admin token file {path}: accessible by group/others "
                                 f"(mode {mode}); run: chmod 600 {path}")
        token = text.strip()
        if not token:
            raise TokenFileError(f"admin token file {path}: is empty")
        if any(c.isspace() for c in token):
            raise TokenFileError(f"admin token file {path}: token must be one word")
        return token

    def _create(self, path: Path) -> str:
        token = secrets.token_urlsafe(32)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return self._read(path)     # lost a race with another creator: use theirs
        except OSError as e:
            raise TokenFileError(f"admin token file {path}: cannot create: "
                                 f"{e.strerror or e}") from None
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(token + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            raise TokenFileError(f"admin token file {path}: cannot write: "
                                 f"{e.strerror or e}") from None
        self._log.info("admin token file {path} created (mode 0600)", path=str(path))
        return token

    def check(self, request) -> bool:
        """True if ``request`` carries the right bearer token."""
        if self._token is None:
            return False
        given = _token_from_header(request.getHeader(b"authorization"))
        if given is None:
            return False
        return hmac.compare_digest(given, self._token)


class AllowAll:
    """Lets every request in (tests only)."""

    def load_or_create(self) -> None:
        return None

    def check(self, request) -> bool:
        return True
