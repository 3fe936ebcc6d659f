"""The embedded store's file: one SQLite database, used from one writer thread.

Layout (``<state_dir>/store.sqlite3``, WAL mode; open it with the ``sqlite3``
shell to look around)::

    keys(key, kind, value, expires)   one row per key: kind 's' (string, value
                                      in the row), 'h' (hash), 'z' (sorted set);
                                      expires: absolute UNIX time or NULL
    hfields(key, field, value)        one row per field of a large hash
    zmembers(key, member, score)      one row per sorted-set member
    meta(name, value)                 format, instance id, last probe

Hashes come in two shapes.  A small one (at most ``COMPACT_HASH_FIELDS``
fields: a lease record, a registration) is one row: its ``keys`` row holds
the whole hash as a JSON object in ``value``, rewritten when any field
changes -- one row instead of a row per field (a DHCP lease record has 16
fields: writing it cost 17 rows).  A large one (a map with a field per
member) has ``value`` NULL and a ``hfields`` row per field, so a change of one
field rewrites that field's row.  A hash changes shape when it crosses the
limit (the other shape's rows go in the same transaction); a JSON ``value``
wins over stray ``hfields`` rows of the same key.  A change of anything else
costs rows proportional to what changed: a ``zadd`` of one member that
member's row.  Format "1" (every hash in field rows) is read as it is and
marked "2" at open; a build that knows only "1" refuses a "2" file instead of
losing its compact hashes.

Everything here runs in the writer thread (never the reactor): the
connection is opened, used and closed there.  :class:`Batch` is built by the
reactor from the mirror and handed over; :meth:`SQLiteFile.apply` writes it
as one transaction.  SQLite gives the atomicity and crash recovery: a batch
is on disk entirely or not at all, and batches become durable in order.

``fsync`` maps onto ``PRAGMA synchronous`` (WAL mode):

* ``always`` -> ``FULL``: the WAL is fsynced at every commit.  A commit
  survives a process crash and a power loss.
* ``batch``  -> ``NORMAL``: a commit is written to the WAL (the OS has it)
  but fsynced only at checkpoints, which the store runs at least every
  ``batch_interval_s``.  Survives a process crash; a power loss can lose the
  commits of the last interval (never part of one: what remains is a prefix).
* ``never``  -> ``OFF``: written, never fsynced by SQLite.  Survives a process
  crash; a power loss or OS crash can lose recent commits and, as SQLite
  documents, may corrupt the database.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "2"
#: formats this build reads ("1": every hash in field rows; marked "2" at open)
READS_FORMATS = ("1", "2")
#: hashes with at most this many fields are one row (see the module docstring)
COMPACT_HASH_FIELDS = 32
FILENAME = "store.sqlite3"
SYNCHRONOUS = {"always": "FULL", "batch": "NORMAL", "never": "OFF"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('s', 'h', 'z')),
    value TEXT,
    expires REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hfields (
    key TEXT NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (key, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS zmembers (
    key TEXT NOT NULL, member TEXT NOT NULL, score REAL NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value TEXT) WITHOUT ROWID;
"""


@dataclass
class Batch:
    """The rows one transaction writes (built in the reactor from the mirror)."""

    drop: list = field(default_factory=list)        # (key,): the key and all its rows go
                                                    # (before ``keys`` re-inserts it)
    keys: list = field(default_factory=list)        # (key, kind, value, expires)
    expires: list = field(default_factory=list)     # (expires, key)
    hset: list = field(default_factory=list)        # (key, field, value)
    hdel: list = field(default_factory=list)        # (key, field)
    zadd: list = field(default_factory=list)        # (key, member, score)
    zdel: list = field(default_factory=list)        # (key, member)

    def __bool__(self) -> bool:
        return bool(self.drop or self.keys or self.expires or self.hset or self.hdel
                    or self.zadd or self.zdel)

    def rows(self) -> int:
        return (len(self.drop) + len(self.keys) + len(self.expires) + len(self.hset)
                + len(self.hdel) + len(self.zadd) + len(self.zdel))


def _compact(key: str, value: str) -> dict:
    """A one-row hash's fields (its JSON object of strings)."""
    try:
        h = json.loads(value)
    except ValueError:
        h = None
    if not isinstance(h, dict) or not all(isinstance(f, str) and isinstance(v, str)
                                          for f, v in h.items()):
        raise sqlite3.DatabaseError(f"hash {key!r}: its row is not a JSON object of strings")
    return h


# upserts: the row is updated in place (INSERT OR REPLACE deletes and re-inserts it,
# ~13 % more SQLite time for a commit of lease rows)
_UPSERT_KEY = ("INSERT INTO keys VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
               "kind = excluded.kind, value = excluded.value, expires = excluded.expires")
_UPSERT_FIELD = ("INSERT INTO hfields VALUES (?, ?, ?) ON CONFLICT (key, field) DO UPDATE SET "
                 "value = excluded.value")
_UPSERT_MEMBER = ("INSERT INTO zmembers VALUES (?, ?, ?) ON CONFLICT (key, member) DO UPDATE "
                  "SET score = excluded.score")


class OldFormatError(Exception):
    """The state dir holds the journal of the store before SQLite."""


class SQLiteFile:
    """One connection to the store's database (writer thread only)."""

    def __init__(self, state_dir: str | Path, fsync: str):
        if fsync not in SYNCHRONOUS:
            raise ValueError(f"fsync must be always|batch|never, not {fsync!r}")
        self.dir = Path(state_dir)
        self.path = self.dir / FILENAME
        self.fsync = fsync
        self.conn: sqlite3.Connection | None = None
        self.instance: str | None = None
        #: after :meth:`load`: the hashes stored as field rows (the large ones)
        self.row_hashes: set[str] = set()

    # -- open / load / close ------------------------------------------------
    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        old = self.dir / "store"
        if old.is_dir() and any(old.glob("journal.*")) or (old / "snapshot").exists():
            raise OldFormatError(
                f"{old} holds a journal of the old memory store (before SQLite); this version "
                f"keeps its state in {self.path}. Move {old} away (its leases are not imported)")
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")      # an operator's sqlite3 shell
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (got {mode})")
            conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS[self.fsync]}")
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
            elif row[0] not in READS_FORMATS:
                conn.execute("ROLLBACK")
                raise sqlite3.DatabaseError(f"{self.path}: format {row[0]!r}, expected {FORMAT!r}")
            elif row[0] != FORMAT:            # its rows are valid as they are
                conn.execute("UPDATE meta SET value = ? WHERE name = 'format'", (FORMAT,))
            row = conn.execute("SELECT value FROM meta WHERE name = 'instance'").fetchone()
            if row is None:
                self.instance = uuid.uuid4().hex
                conn.execute("INSERT INTO meta VALUES ('instance', ?)", (self.instance,))
            else:
                self.instance = row[0]
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def load(self) -> tuple[dict, dict, dict, dict]:
        """Everything on disk: ``(strings, hashes, zsets, expiry)``: key -> value,
        key -> {field: value}, key -> {member: score}, key -> expires."""
        c = self.conn
        strings: dict = {}
        hashes: dict = {}
        zsets: dict = {}
        expiry: dict = {}
        rows: set = set()
        for key, kind, value, expires in c.execute("SELECT key, kind, value, expires FROM keys"):
            if kind == "s":
                strings[key] = value
            elif kind == "h":
                if value is None:
                    hashes[key] = {}
                    rows.add(key)
                else:
                    hashes[key] = _compact(key, value)
            else:
                zsets[key] = {}
            if expires is not None:
                expiry[key] = expires
        for key, f, value in c.execute("SELECT key, field, value FROM hfields"):
            if key in rows:
                hashes[key][f] = value
        self.row_hashes = rows
        for key, member, score in c.execute("SELECT key, member, score FROM zmembers"):
            z = zsets.get(key)
            if z is not None:
                z[member] = score
        for table in (hashes, zsets):        # never written so, but never invent a key
            for key in [k for k, v in table.items() if not v]:
                del table[key]
                expiry.pop(key, None)
        return strings, hashes, zsets, expiry

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    # -- writes ---------------------------------------------------------------
    def apply(self, batch: Batch) -> float:
        """Write ``batch`` as one transaction; return the seconds it took."""
        t0 = time.monotonic()
        c = self.conn
        if c is None:
            raise sqlite3.OperationalError("store database is closed")
        with self._transaction():
            if batch.drop:
                c.executemany("DELETE FROM keys WHERE key = ?", batch.drop)
                c.executemany("DELETE FROM hfields WHERE key = ?", batch.drop)
                c.executemany("DELETE FROM zmembers WHERE key = ?", batch.drop)
            if batch.keys:
                c.executemany(_UPSERT_KEY, batch.keys)
            if batch.expires:
                c.executemany("UPDATE keys SET expires = ? WHERE key = ?", batch.expires)
            if batch.hdel:
                c.executemany("DELETE FROM hfields WHERE key = ? AND field = ?", batch.hdel)
            if batch.hset:
                c.executemany(_UPSERT_FIELD, batch.hset)
            if batch.zdel:
                c.executemany("DELETE FROM zmembers WHERE key = ? AND member = ?", batch.zdel)
            if batch.zadd:
                c.executemany(_UPSERT_MEMBER, batch.zadd)
        return time.monotonic() - t0

    @contextlib.contextmanager
    def _transaction(self):
        """BEGIN IMMEDIATE ... COMMIT; ROLLBACK if anything in between fails."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
            c.execute("COMMIT")
        except BaseException:
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    def checkpoint(self) -> None:
        """Copy the WAL into the database (fsyncs both unless ``never``)."""
        if self.conn is not None:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def probe(self, min_free_bytes: int = 0) -> None:
        """Does the disk take a transaction again?  A real write, and at least
        ``min_free_bytes`` free: a one-row write can fit in WAL space a failed
        transaction left allocated, so it alone would call a full disk fine."""
        if min_free_bytes:
            st = os.statvfs(self.dir)
            free = st.f_bavail * st.f_frsize
            if free < min_free_bytes:
                raise OSError(28, f"disk full: {free} bytes free in {self.dir}, "
                                  f"the store needs at least {min_free_bytes}")
        with self._transaction() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)", (repr(time.time()),))

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(str(self.path) + suffix).st_size
            except OSError:
                pass
        return total
