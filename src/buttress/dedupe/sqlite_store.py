"""SQLiteStore: the embedded default, one table in a WAL-mode database file.

Safe for several processes on one machine: every claim is a ``BEGIN
IMMEDIATE`` transaction, which takes SQLite's single write lock up front, so
two processes claiming the same id are serialised and the second one sees the
first one's row.  Readers never block in WAL mode.  A write lock held by
someone else is waited for (``busy_timeout``), retried a bounded number of
times, and then reported as :class:`~buttress.StoreUnavailable`.

Records carry an indexed ``expires_at`` (epoch ms).  A record past it reads as
absent at once; the row itself is deleted by :meth:`SQLiteStore.sweep`, which
works in small batches, each its own short transaction, within a time budget,
so it never holds the write lock for long.  The store sweeps by itself every
``sweep_every`` seconds, after a claim.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import random
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from buttress._validate import (
    require_choice,
    require_int,
    require_number,
    require_path,
    require_str,
)
from buttress.dedupe.store import (
    CLAIM_CONFLICT,
    CLAIM_DUPLICATE,
    CLAIM_IN_PROGRESS,
    ClaimRecord,
)
from buttress.errors import StoreUnavailable

__all__ = ["AsyncSQLiteStore", "SQLiteStore"]

logger = logging.getLogger("buttress.dedupe")

T = TypeVar("T")

_CLAIMED, _DONE = 0, 1
# Bound parameters per statement stay under 999, the limit of SQLite before 3.32.
_MAX_VARIABLES = 500  # ids per IN (...) list
_INSERT_ROWS = 250  # rows per multi-row INSERT (2 parameters each)
_UINT64 = 1 << 64


class SQLiteStore:
    """Claim records in an SQLite file (WAL mode), shared by processes on one machine.

    ``path`` is a str or ``os.PathLike`` (not bytes, not empty: the rule of
    ``buttress._validate.require_path``).  ``":memory:"`` opens a store private
    to this process (a forked child starts an empty one): for tests only.
    ``busy_timeout`` (seconds) is how long one attempt waits for another
    writer's lock; after ``lock_retries`` more attempts the call raises
    :class:`~buttress.StoreUnavailable`.  ``sweep_every`` (seconds, None to
    turn off) schedules an automatic :meth:`sweep` of at most ``sweep_budget``
    seconds.  ``synchronous="NORMAL"`` survives a process crash (WAL); use
    ``"FULL"`` to survive power loss too, at the cost of an fsync per commit.

    One store object may be shared by threads (calls are serialised); each
    process needs its own (a forked child reopens the file by itself).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "buttress_dedupe",
        busy_timeout: float = 5.0,
        lock_retries: int = 3,
        sweep_every: float | None = 60.0,
        sweep_budget: float = 0.05,
        sweep_batch: int = 1000,
        synchronous: str = "NORMAL",
    ) -> None:
        # The project's one path rule: str or os.PathLike of str, not empty.  bytes paths
        # are refused (as everywhere in buttress); "" (sqlite3's private temporary database,
        # a new one per connection, so not shared even by this store's forked children)
        # is refused as a mistake.  ":memory:" is a str and still opens, for a
        # single-process store in tests.
        path = require_path("path", path)
        if not require_str("table", table).isidentifier():
            raise ValueError(f"table must be a plain identifier, got {table!r}")
        busy_timeout = require_number("busy_timeout", busy_timeout, minimum=0)
        lock_retries = require_int("lock_retries", lock_retries, minimum=0)
        if sweep_every is not None:
            sweep_every = require_number("sweep_every", sweep_every, above=0)
        sweep_budget = require_number("sweep_budget", sweep_budget, above=0)
        sweep_batch = require_int("sweep_batch", sweep_batch, minimum=1)
        require_choice("synchronous", require_str("synchronous", synchronous).upper(),
                       ("OFF", "NORMAL", "FULL", "EXTRA"))
        self.path = path
        self.table = table
        self.busy_timeout = busy_timeout
        self.lock_retries = lock_retries
        self.sweep_every = sweep_every
        self.sweep_budget = sweep_budget
        self.sweep_batch = sweep_batch
        self.synchronous = synchronous.upper()
        self._lock = threading.Lock()
        self._counts = {"transactions": 0, "lock_retries": 0, "swept": 0}
        self._next_sweep = time.monotonic() + (sweep_every or 0.0)
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._sql = _Statements(table)
        self._with_retries(lambda conn: None)  # fail now, clearly, if the file is unusable

    # -- the store interface ------------------------------------------------------------

    def claim(self, msg_ids: Sequence[str], fingerprints: Sequence[int], *, token: str,
              lease_ms: int, ttl_ms: int) -> list[int]:
        # SQLite integers are signed: the same 64 bits read as int64 (C speed, via struct).
        count = len(fingerprints)
        if len(msg_ids) != count:
            raise ValueError(f"got {len(msg_ids)} msg_ids and {count} fingerprints")
        signed = struct.unpack(f"{count}q", struct.pack(f"{count}Q", *fingerprints))

        def transaction(conn: sqlite3.Connection) -> list[int]:
            now = _now_ms()
            lease_until, expires_at = now + lease_ms, now + ttl_ms
            before = conn.total_changes
            # Multi-row INSERT ... VALUES in chunks: SQLite steps one statement per chunk,
            # not per row, which is about 40% cheaper than executemany here.
            flat: list[Any] = [None] * (2 * count)
            flat[0::2], flat[1::2] = msg_ids, signed
            for start in range(0, len(flat), 2 * _INSERT_ROWS):
                chunk = flat[start:start + 2 * _INSERT_ROWS]
                conn.execute(self._sql.insert(len(chunk) // 2),
                             [token, lease_until, expires_at, *chunk])
            if conn.total_changes - before == len(msg_ids):
                return [1] * len(msg_ids)  # the common case: every id was new
            return self._resolve_existing(conn, msg_ids, signed, token, now, lease_until,
                                          expires_at)

        codes = self._write(transaction)
        if self.sweep_every is not None and time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.sweep_every
            try:
                self.sweep(budget=self.sweep_budget)
            except StoreUnavailable as exc:
                # The claims are committed: a failed cleanup must not make them look lost.
                logger.warning("automatic sweep of %s failed, will retry: %s", self.path, exc)
        return codes

    def complete(self, msg_ids: Sequence[str], attempts: Sequence[int], *, token: str,
                 ttl_ms: int) -> list[bool]:
        def transaction(conn: sqlite3.Connection) -> list[bool]:
            expires_at = _now_ms() + ttl_ms
            rows = [(expires_at, msg_id, token, attempt)
                    for msg_id, attempt in zip(msg_ids, attempts, strict=True)]
            return self._owner_checked(conn, self._sql.complete, rows, msg_ids, token, _DONE)

        return self._write(transaction)

    def release(self, msg_ids: Sequence[str], attempts: Sequence[int], *,
                token: str) -> list[bool]:
        def transaction(conn: sqlite3.Connection) -> list[bool]:
            rows = [(msg_id, token, attempt)
                    for msg_id, attempt in zip(msg_ids, attempts, strict=True)]
            return self._owner_checked(conn, self._sql.release, rows, msg_ids, token, _CLAIMED)

        return self._write(transaction)

    def lookup(self, msg_id: str) -> ClaimRecord | None:
        def read(conn: sqlite3.Connection) -> ClaimRecord | None:
            row = conn.execute(self._sql.lookup, (msg_id, _now_ms())).fetchone()
            if row is None:
                return None
            state, fp, token, attempt, lease_until = row
            return ClaimRecord(msg_id, "done" if state == _DONE else "claimed", attempt,
                               fp + _UINT64 if fp < 0 else fp, token, lease_until)

        return self._with_retries(read)

    def sweep(self, *, budget: float = 0.05) -> int:
        """Delete expired rows, ``sweep_batch`` per short transaction, for about ``budget`` s.

        Each batch finds its rows through the ``expires_at`` index, so a sweep's
        cost follows the number of expired rows, not the table's size; claims
        wait at most one batch for the write lock.
        """
        require_number("budget", budget, above=0)
        deadline = time.monotonic() + budget
        deleted = 0
        while True:
            def delete_batch(conn: sqlite3.Connection) -> int:
                return conn.execute(self._sql.sweep, (_now_ms(), self.sweep_batch)).rowcount

            batch = self._write(delete_batch)
            deleted += batch
            if batch < self.sweep_batch or time.monotonic() >= deadline:
                break
        with self._lock:
            self._counts["swept"] += deleted
        if deleted:
            logger.debug("swept %d expired dedupe records from %s", deleted, self.path)
        return deleted

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"store": "sqlite", "path": self.path, "table": self.table, **self._counts}

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            conn.close()

    # -- helpers ----------------------------------------------------------------------

    def _resolve_existing(self, conn: sqlite3.Connection, msg_ids: Sequence[str],
                          signed: Sequence[int], token: str, now: int, lease_until: int,
                          expires_at: int) -> list[int]:
        """Decide each id that INSERT OR IGNORE skipped: expired, taken over, or not ours."""
        existing: dict[str, tuple[int, int, str, int, int, int]] = {}
        for chunk in _chunks(msg_ids, _MAX_VARIABLES):
            marks = ",".join("?" * len(chunk))
            for row in conn.execute(self._sql.select_many.format(marks=marks), chunk):
                existing[row[0]] = row[1:]
        codes: list[int] = []
        takeovers: list[tuple[int, int, str, int, int, int, str]] = []
        for msg_id, fp in zip(msg_ids, signed, strict=True):
            state, held, holder, attempt, held_lease, held_expiry = existing[msg_id]
            if holder == token and held_expiry > now:
                # Ours: inserted by this very transaction, or by an earlier claim call with
                # this token whose reply was lost (the Deduplicator resends its token).
                codes.append(CLAIM_DUPLICATE if state == _DONE else attempt)
                if state != _DONE and held_lease != lease_until:
                    takeovers.append((_CLAIMED, fp, token, attempt, lease_until, expires_at,
                                      msg_id))
            elif held_expiry <= now:  # expired, not yet swept: as good as absent
                takeovers.append((_CLAIMED, fp, token, 1, lease_until, expires_at, msg_id))
                codes.append(1)
            elif held != fp:
                codes.append(CLAIM_CONFLICT)
            elif state == _DONE:
                codes.append(CLAIM_DUPLICATE)
            elif held_lease > now:
                codes.append(CLAIM_IN_PROGRESS)
            else:  # the owner's lease lapsed: take over as the next attempt
                takeovers.append((_CLAIMED, fp, token, attempt + 1, lease_until, expires_at,
                                  msg_id))
                codes.append(attempt + 1)
        if takeovers:
            conn.executemany(self._sql.take_over, takeovers)
        return codes

    def _owner_checked(self, conn: sqlite3.Connection, statement: str, rows: list[Any],
                       msg_ids: Sequence[str], token: str, state: int) -> list[bool]:
        """Apply an owner-checked UPDATE per row and say which rows it changed."""
        before = conn.total_changes
        conn.executemany(statement, rows)
        if conn.total_changes - before == len(rows):
            return [True] * len(rows)
        # Some were fenced: a row is ours now exactly when it carries our token in the
        # target state (tokens are unique per claim call, and a takeover replaces them).
        ours: set[str] = set()
        for chunk in _chunks(msg_ids, _MAX_VARIABLES):
            marks = ",".join("?" * len(chunk))
            ours.update(row[0] for row in conn.execute(
                self._sql.select_owned.format(marks=marks), [token, state, *chunk]))
        return [msg_id in ours for msg_id in msg_ids]

    def _write(self, transaction: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``transaction`` inside BEGIN IMMEDIATE ... COMMIT, with bounded lock retries."""
        def run(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = transaction(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._counts["transactions"] += 1
            return result

        return self._with_retries(run)

    def _with_retries(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            for attempt in range(self.lock_retries + 1):
                try:
                    return work(self._connection())
                except sqlite3.OperationalError as exc:
                    if not _is_locked(exc):
                        raise StoreUnavailable(
                            f"SQLite database {self.path!r} failed: {exc}") from exc
                    if attempt == self.lock_retries:
                        raise StoreUnavailable(
                            f"SQLite database {self.path!r} stayed locked by another writer "
                            f"through {self.lock_retries + 1} attempts of busy_timeout="
                            f"{self.busy_timeout}s each; nothing was changed") from exc
                    self._counts["lock_retries"] += 1
                    time.sleep(random.uniform(0.0, 0.05) * (attempt + 1))  # de-synchronise
                except sqlite3.DatabaseError as exc:
                    raise StoreUnavailable(f"SQLite database {self.path!r} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _connection(self) -> sqlite3.Connection:
        """This process's connection, opened (and the schema made) on first use."""
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute("BEGIN IMMEDIATE")
            for statement in self._sql.schema:
                conn.execute(statement)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError) and _is_locked(exc):
                raise  # the caller's retry loop handles a locked file
            raise StoreUnavailable(f"cannot use SQLite database {self.path!r}: {exc}") from exc
        self._conn, self._pid = conn, os.getpid()
        return conn

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, table={self.table!r})"


class AsyncSQLiteStore:
    """:class:`SQLiteStore` for an :class:`~buttress.AsyncDeduplicator`: one dedicated thread.

    Each call runs the sync store's own method on a single thread owned by this
    store, so the event loop never blocks on SQLite's locks or fsyncs, and
    records, SQL and transactions are the sync store's, byte for byte (a sync
    and an async consumer share one file).  One thread, not a pool: SQLite
    takes one writer at a time anyway, and one thread keeps one connection
    and the calls in order.  Arguments as :class:`SQLiteStore`; ``store``
    wraps an existing one instead.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 store: SQLiteStore | None = None, **kwargs: Any) -> None:
        if (path is None) == (store is None):
            raise TypeError("AsyncSQLiteStore needs a path or store=SQLiteStore(...), not both")
        if store is not None and not isinstance(store, SQLiteStore):
            raise TypeError(f"store must be a SQLiteStore, got {type(store).__name__}")
        self.store = store if store is not None else SQLiteStore(path, **kwargs)  # type: ignore[arg-type]
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="buttress-sqlite")

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor,
                                          functools.partial(function, *args, **kwargs))

    async def claim(self, msg_ids: Sequence[str], fingerprints: Sequence[int], *, token: str,
                    lease_ms: int, ttl_ms: int) -> list[int]:
        return await self._call(self.store.claim, msg_ids, fingerprints, token=token,
                                lease_ms=lease_ms, ttl_ms=ttl_ms)

    async def complete(self, msg_ids: Sequence[str], attempts: Sequence[int], *, token: str,
                       ttl_ms: int) -> list[bool]:
        return await self._call(self.store.complete, msg_ids, attempts, token=token,
                                ttl_ms=ttl_ms)

    async def release(self, msg_ids: Sequence[str], attempts: Sequence[int], *,
                      token: str) -> list[bool]:
        return await self._call(self.store.release, msg_ids, attempts, token=token)

    async def lookup(self, msg_id: str) -> ClaimRecord | None:
        return await self._call(self.store.lookup, msg_id)

    async def sweep(self, *, budget: float = 0.05) -> int:
        return await self._call(self.store.sweep, budget=budget)

    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    async def close(self) -> None:
        """Close the connection on its thread, then stop the thread."""
        await self._call(self.store.close)
        self._executor.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"AsyncSQLiteStore({self.store.path!r}, table={self.store.table!r})"


class _Statements:
    """The SQL of one table, written out once."""

    def __init__(self, table: str) -> None:
        self.schema = (
            f"""CREATE TABLE IF NOT EXISTS {table} (
                msg_id TEXT PRIMARY KEY,
                state INTEGER NOT NULL,        -- 0 claimed, 1 done
                fingerprint INTEGER NOT NULL,  -- XXH64 of the payload, as signed int64
                token TEXT NOT NULL,           -- owner token of the claim call
                attempt INTEGER NOT NULL,      -- fence: bumped by every takeover
                lease_until INTEGER NOT NULL,  -- epoch ms; 0 once released or done
                expires_at INTEGER NOT NULL    -- epoch ms; the row reads as absent after it
            ) WITHOUT ROWID""",
            f"CREATE INDEX IF NOT EXISTS {table}_expires_at ON {table} (expires_at)",
        )
        self._insert = (f"INSERT OR IGNORE INTO {table} (msg_id, state, fingerprint, token, "
                        f"attempt, lease_until, expires_at) "
                        f"SELECT column1, 0, column2, ?, 1, ?, ? FROM (VALUES {{rows}})")
        self._inserts: dict[int, str] = {}
        self.select_many = (f"SELECT msg_id, state, fingerprint, token, attempt, lease_until, "
                            f"expires_at FROM {table} WHERE msg_id IN ({{marks}})")
        self.take_over = (f"UPDATE {table} SET state = ?, fingerprint = ?, token = ?, "
                          f"attempt = ?, lease_until = ?, expires_at = ? WHERE msg_id = ?")
        self.complete = (f"UPDATE {table} SET state = 1, lease_until = 0, expires_at = ? "
                         f"WHERE msg_id = ? AND state = 0 AND token = ? AND attempt = ?")
        self.release = (f"UPDATE {table} SET lease_until = 0 "
                        f"WHERE msg_id = ? AND state = 0 AND token = ? AND attempt = ?")
        self.select_owned = (f"SELECT msg_id FROM {table} WHERE token = ? AND state = ? "
                             f"AND msg_id IN ({{marks}})")
        self.lookup = (f"SELECT state, fingerprint, token, attempt, lease_until FROM {table} "
                       f"WHERE msg_id = ? AND expires_at > ?")
        self.sweep = (f"DELETE FROM {table} WHERE msg_id IN "
                      f"(SELECT msg_id FROM {table} WHERE expires_at <= ? LIMIT ?)")

    def insert(self, rows: int) -> str:
        """INSERT OR IGNORE of ``rows`` new claims.

        Parameters: token, lease_until, expires_at, then msg_id and fingerprint per row.
        """
        statement = self._inserts.get(rows)
        if statement is None:
            statement = self._insert.format(rows=",".join(["(?,?)"] * rows))
            self._inserts[rows] = statement
        return statement


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    message = str(exc)
    return "locked" in message or "busy" in message


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
