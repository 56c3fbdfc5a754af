"""Group commit: one writer thread per hub process commits concurrent writes in batches.

One transaction per request caps a hub at the disk's commit rate (an fsync each on SQLite with
`synchronous=FULL`, a WAL flush each on PostgreSQL). Here requests queue; the writer takes as many
as are waiting (up to `max_batch`), runs each in a savepoint of one transaction and commits once,
then answers them all. No request is answered before the commit that holds its effect, so an
acknowledged write survives a crash, and one that was not acknowledged left nothing behind.

Each item keeps its own outcome. A domain refusal is an outcome like any other (stored for
idempotency and committed with the batch). A database error inside one item — a deadlock with
another hub process, a twin request's idempotency claim — rolls back that item's savepoint only,
and the item runs again alone after the batch, in a transaction of its own with bounded retries
(on a thread beside the writer, so its backoff does not hold up the next batch).
If the batch itself cannot commit, every item of it runs again alone the same way: nothing of the
failed batch happened, so nothing is doubled. A bug in one item fails that request, not its
neighbours.

Writes of one kind can also be run *together*: an item may carry a `Bulk` — a handler shared by
its kind and the item's own payload — and the writer hands all the payloads of one handler to it
at once, in one savepoint, so a hundred conversions cost a handful of set-based statements
rather than a hundred times thirty. If the handler fails with a database error (or a bug), its
savepoint is rolled back and each of its items runs the ordinary way, one savepoint each.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from exchange.store import bulk, mutation
from exchange.store.engine import write_transaction

log = logging.getLogger("pointsx.writer")
T = TypeVar("T")
DEFAULT_MAX_BATCH = 256


# Runs many items' payloads inside the batch's transaction; answers each, in order.
BulkHandler = Callable[[Connection, list[Any]], list[Any]]


@dataclass(frozen=True)
class Bulk:
    """How an item can run together with others of its kind: the shared handler, its own payload."""

    handler: BulkHandler
    payload: Any


@dataclass
class _Item(Generic[T]):
    work: Callable[[Connection], T]  # inside a savepoint of the batch's transaction
    alone: Callable[[], T]  # the same in a transaction of its own, with its own retries
    bulk: Bulk | None = None
    future: Future[T] = field(default_factory=Future)


@dataclass
class WriterStats:
    """What the writer has done: for the logs, metrics and the benchmark's report."""

    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    alone: int = 0  # items run again on their own (contention, twins, a failed commit)
    bulk_runs: int = 0  # handler calls that ran several items together
    bulk_fallbacks: int = 0  # handler calls that met a database conflict; their items ran one by one
    bulk_bugs: int = 0  # handler calls that raised anything else (a bug: logged), their items likewise


def _undo(conn: Connection, savepoint: Any) -> None:
    """Roll an item's savepoint back — first any savepoint the failed work left open inside it."""
    while (inner := conn.get_nested_transaction()) is not None and inner is not savepoint:
        inner.rollback()
    if savepoint.is_active:
        savepoint.rollback()


class LedgerWriter:
    """The process's one writer: `submit` from any thread, a future answers after the commit."""

    def __init__(self, engine: Engine, *, max_batch: int = DEFAULT_MAX_BATCH, name: str = "ledger-writer") -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.engine = engine
        self.max_batch = max_batch
        self.stats = WriterStats()
        self._queue: queue.SimpleQueue[_Item[Any] | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        # Items that must run again in transactions of their own (after a conflict): beside the loop.
        self._alone = ThreadPoolExecutor(2, thread_name_prefix=f"{name}-alone")
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[Connection], T], alone: Callable[[], T], bulk: Bulk | None = None) -> Future[T]:
        item: _Item[T] = _Item(work, alone, bulk)
        with self._lock:
            if self._closed:
                raise RuntimeError("the ledger writer is closed")
            self._queue.put(item)
        return item.future

    def close(self) -> None:
        """Finish what is queued, then stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()
        self._alone.shutdown(wait=True)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch: list[_Item[Any]] = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self._commit(batch)
            except BaseException as exc:  # never lose the writer: answer what is unanswered, go on
                log.exception("the ledger writer failed a batch of %d", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            if stop:
                return

    @staticmethod
    def _conflict(exc: DBAPIError) -> None:
        """Classified as the mutation runner does (a test spies on it): retryable, or a real error."""
        if not mutation.is_retryable(exc):
            log.debug("a write met %s inside a batch", exc.orig)

    def _run_item(
        self,
        conn: Connection,
        item: _Item[Any],
        answers: list[tuple[_Item[Any], Any, BaseException | None]],
        again: list[_Item[Any]],
    ) -> None:
        savepoint = conn.begin_nested()
        try:
            value = item.work(conn)
        except DBAPIError as exc:
            _undo(conn, savepoint)
            self._conflict(exc)
            again.append(item)
            return
        except Exception as exc:  # a bug in this item: it fails alone
            _undo(conn, savepoint)
            log.exception("a write failed inside a batch")
            answers.append((item, None, exc))
            return
        savepoint.commit()
        answers.append((item, value, None))

    def _run_bulk(
        self,
        conn: Connection,
        handler: BulkHandler,
        items: list[_Item[Any]],
        answers: list[tuple[_Item[Any], Any, BaseException | None]],
        again: list[_Item[Any]],
    ) -> None:
        savepoint = conn.begin_nested()
        try:
            with bulk.deferring(conn):  # the run's writes go to the database as one statement
                values = handler(conn, [item.bulk.payload for item in items if item.bulk is not None])
            if len(values) != len(items):
                raise AssertionError(f"a bulk handler answered {len(values)} of {len(items)} items")
        except Exception as exc:
            _undo(conn, savepoint)
            if isinstance(exc, DBAPIError | bulk.RowsMoved):
                self.stats.bulk_fallbacks += 1
                if isinstance(exc, DBAPIError):
                    self._conflict(exc)
            else:
                self.stats.bulk_bugs += 1
                log.exception("a bulk write failed inside a batch; its %d items run one by one", len(items))
            for item in items:
                self._run_item(conn, item, answers, again)
            return
        savepoint.commit()
        self.stats.bulk_runs += 1
        answers.extend((item, value, None) for item, value in zip(items, values, strict=True))

    def _commit(self, taken: list[_Item[Any]]) -> None:
        # A request whose caller gave up while it was queued (its deadline passed, the asyncio side
        # cancelled the future) is dropped unrun; every other future is marked running, so nothing
        # can cancel it any more and its answer — after the commit — always lands.
        batch = [item for item in taken if item.future.set_running_or_notify_cancel()]
        if not batch:
            return
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        answers: list[tuple[_Item[Any], Any, BaseException | None]] = []
        again: list[_Item[Any]] = []
        try:
            with write_transaction(self.engine) as conn:
                mutation.defer_audit(conn)  # the audit head last, once per batch: see write_deferred
                try:
                    # Single items first, then each kind together: a bulk lookup sees what ran before it.
                    groups: dict[BulkHandler, list[_Item[Any]]] = {}
                    for item in batch:
                        if item.bulk is None:
                            self._run_item(conn, item, answers, again)
                        else:
                            groups.setdefault(item.bulk.handler, []).append(item)
                    for handler, items in groups.items():
                        self._run_bulk(conn, handler, items, answers, again)
                    mutation.write_deferred(conn)
                finally:
                    mutation.forget_deferred(conn)
        except DBAPIError as exc:  # the commit (or a savepoint statement) failed: nothing happened
            self._conflict(exc)
            log.info("batch of %d could not commit (%s); each runs alone", len(batch), type(exc.orig).__name__)
            answers, again = [], batch
        for item, value, error in answers:
            if error is None:
                item.future.set_result(value)
            else:
                item.future.set_exception(error)
        for item in again:  # on threads of their own: their retries back off without holding up the next batch
            self.stats.alone += 1
            self._alone.submit(self._run_alone, item)

    @staticmethod
    def _run_alone(item: _Item[Any]) -> None:
        try:
            item.future.set_result(item.alone())
        except Exception as exc:
            item.future.set_exception(exc)
