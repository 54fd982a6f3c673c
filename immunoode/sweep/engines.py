"""Stage 7 — execution engines.  Consume a picklable function and a list of ``(key, payload)``
work items; produce ``(key, result)`` pairs as items finish (a raised exception is returned
as the result, so that the runner records or retries it — never drops it).

* :class:`SerialEngine` — in this process (debugging, tiny sweeps);
* :class:`ProcessEngine` — ``concurrent.futures.ProcessPoolExecutor`` on this machine
  (the default, ``n_workers`` processes);
* :class:`DaskEngine` — a ``dask.distributed`` cluster: an existing ``Client``, a scheduler
  address, or a ``LocalCluster`` of ``n_workers`` single-threaded processes.

Workers load the compiled model from the on-disk compile cache (the runner compiles it in
the parent before dispatch), so no chunk recompiles.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Iterator, Sequence

__all__ = ["AbstractEngine", "SerialEngine", "ProcessEngine", "DaskEngine", "make_engine"]


class AbstractEngine(abc.ABC):
    """Contract: :meth:`imap_unordered` runs ``fn(payload)`` for every item and yields
    ``(key, result)`` in completion order, with an exception object as ``result`` when
    ``fn`` raised or the worker died.  It must not reorder or modify payloads, must stop
    submitting and cancel pending work on ``KeyboardInterrupt`` (then re-raise), and must
    not hold more than the running items' results.  :meth:`close` releases resources the
    engine created (never a client it was given)."""

    name: str = "abstract"
    n_workers: int = 1

    @abc.abstractmethod
    def imap_unordered(self, fn: Callable, items: Sequence[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """Yield ``(key, result or exception)`` as items finish."""

    def close(self) -> None:
        """Release what the engine started."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> str:
        return f"{self.name} ({self.n_workers} worker{'s' if self.n_workers != 1 else ''})"


class SerialEngine(AbstractEngine):
    """Run every item in this process, in order."""

    name = "serial"

    def imap_unordered(self, fn, items):
        for key, payload in items:
            try:
                yield key, fn(payload)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded by the runner
                yield key, exc


class ProcessEngine(AbstractEngine):
    """A pool of ``n_workers`` processes on this machine (a fresh pool per call, so a
    worker that died does not poison later calls)."""

    name = "processes"

    def __init__(self, n_workers: int = 2):
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        self.n_workers = int(n_workers)

    def imap_unordered(self, fn, items):
        from concurrent.futures import ProcessPoolExecutor, as_completed
        pool = ProcessPoolExecutor(max_workers=self.n_workers)
        futures = {}
        try:
            futures = {pool.submit(fn, payload): key for key, payload in items}
            for fut in as_completed(futures):
                exc = fut.exception()
                yield futures[fut], (exc if exc is not None else fut.result())
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class DaskEngine(AbstractEngine):
    """Run items on a ``dask.distributed`` cluster.

    Parameters
    ----------
    client : an existing ``dask.distributed.Client`` (not closed by this engine).
    address : scheduler address (``tcp://host:8786``) to connect to.
    n_workers : start a ``LocalCluster`` of this many single-threaded worker processes.
    """

    name = "dask"

    def __init__(self, client=None, *, address: str | None = None, n_workers: int | None = None):
        from dask.distributed import Client, LocalCluster
        self._own_client = client is None
        self._cluster = None
        if client is None:
            if address is not None:
                client = Client(address)
            else:
                import dask
                # let workers queue chunks ahead (no scheduler round trip between chunks; the
                # scheduler shares this process with the store writes)
                with dask.config.set({"distributed.scheduler.worker-saturation": float("inf")}):
                    self._cluster = LocalCluster(n_workers=int(n_workers or 2), threads_per_worker=1,
                                                 processes=True, dashboard_address=None)
                client = Client(self._cluster)
        self.client = client
        self.n_workers = len(client.scheduler_info().get("workers", {})) or int(n_workers or 1)

    def imap_unordered(self, fn, items):
        import uuid
        from dask.distributed import as_completed
        futs = {}
        tag = uuid.uuid4().hex[:8]
        try:
            for key, payload in items:
                futs[self.client.submit(fn, payload, pure=False, key=f"immunoode-sweep-{key}-{tag}")] = key
            for fut in as_completed(list(futs)):
                if fut.status == "error":
                    yield futs[fut], fut.exception()
                elif fut.status == "cancelled":
                    yield futs[fut], RuntimeError("the chunk was cancelled by the cluster")
                else:
                    yield futs[fut], fut.result()
                fut.release()
        except KeyboardInterrupt:
            self.client.cancel(list(futs))
            raise

    def close(self) -> None:
        if self._own_client:
            self.client.close()
            if self._cluster is not None:
                self._cluster.close()

    def describe(self) -> str:
        where = "LocalCluster" if self._cluster is not None else "cluster"
        return f"dask {where} ({self.n_workers} workers)"


def make_engine(*, workers: int | None = None, scheduler: str | None = None, client=None,
                dask: bool = False) -> AbstractEngine:
    """Engine from command-line style options: a client or ``scheduler`` address → Dask;
    ``dask=True`` → Dask ``LocalCluster`` of ``workers``; else local processes (``workers``,
    default 2; 1 = in this process)."""
    if client is not None or scheduler is not None:
        return DaskEngine(client, address=scheduler)
    if dask:
        return DaskEngine(n_workers=workers or 2)
    w = 2 if workers is None else int(workers)
    return SerialEngine() if w == 1 else ProcessEngine(w)
