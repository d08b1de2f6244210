"""Process pools for the stages' per-item work (ingest's files and series, the cohort's subjects,
the robustness sets): one way to start workers and one way to survive a worker that dies.

:class:`WorkerPool` starts every worker up front and can be replaced when one dies (a native decoder
crashing on a malformed file, the OOM killer); :func:`run_tasks` runs tasks in it, yielding results
as they finish, retries the unfinished ones in a fresh pool, then one at a time, and hands a task
that still kills its worker to the caller's ``crashed`` (which reports it, or raises).

Each worker keeps freed large blocks in its heap (glibc) and uses one BLAS thread, so results do
not depend on threading and workers do not oversubscribe the cores.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

log = logging.getLogger(__name__)

#: ``fork``: the cheapest start (no re-import), used while the parent has one thread (else
#: forkserver); ``spawn``: a fresh interpreter per worker, for callers whose parent state must not
#: leak into the workers
StartMethod = Literal["fork", "spawn"]


def limit_blas_threads() -> AbstractContextManager[Any]:
    """One BLAS thread: no oversubscription in the pool, and results independent of threading."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is optional
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _tune_allocator() -> None:
    """Keep freed large blocks in the heap instead of returning them to the OS (glibc only).

    Every series allocates and frees a few arrays of megabytes; with glibc's defaults each one is a
    fresh ``mmap`` whose pages the kernel must fault in and zero, which doubled ingest's CPU time
    (half of it system time). Worker processes are short-lived, so holding on to their peak heap
    costs nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 512 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError) as exc:  # not glibc: nothing to tune
        log.debug("allocator tuning skipped: %s", exc)


_WORKER_LIMITS: Any = None


def _worker_init() -> None:
    global _WORKER_LIMITS
    _tune_allocator()
    _WORKER_LIMITS = limit_blas_threads()
    _WORKER_LIMITS.__enter__()


def _noop() -> int:
    return os.getpid()


def _make_executor(workers: int, start: StartMethod, tune: bool) -> Executor:
    methods = multiprocessing.get_all_start_methods()
    ctx: multiprocessing.context.BaseContext
    if start == "fork" and "fork" in methods and threading.active_count() == 1:
        # fork is only safe while this process has one thread: workers are started before a
        # progress bar's refresh thread exists
        ctx = multiprocessing.get_context("fork")
    elif start == "fork" and "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
    else:
        ctx = multiprocessing.get_context("spawn")
    init = _worker_init if tune else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init)
    # Start every worker now (with fork, the first submit launches all of them).
    for f in [pool.submit(_noop) for _ in range(workers)]:
        f.result()
    return pool


class WorkerPool:
    """``workers`` processes, started now; :meth:`restart` replaces them after one died.

    ``tune``: each worker keeps its heap and uses one BLAS thread (see the module docstring); off,
    workers run as the interpreter starts them.

    Raises:
        BrokenProcessPool: a worker died while starting.
    """

    def __init__(self, workers: int, start: StartMethod = "fork", tune: bool = True) -> None:
        if workers < 1:
            raise ValueError(f"workers: must be at least 1, got {workers}")
        self.workers = workers
        self.start = start
        self.tune = tune
        self.executor = _make_executor(workers, start, tune)

    def restart(self) -> None:
        # Waiting for the broken pool's threads lets the new pool fork again (see _make_executor).
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.executor = _make_executor(self.workers, self.start, self.tune)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_tasks(
    pool: WorkerPool | None,
    fn: Callable[..., Any],
    args: Sequence[tuple[Any, ...]],
    crashed: Callable[[tuple[Any, ...]], Iterator[Any]],
    weights: Sequence[int] | None = None,
    advance: Callable[[int], None] = lambda n: None,
) -> Iterator[Any]:
    """Run ``fn(*a)`` for every ``a`` (in ``pool`` when given, else here, in order), yielding the
    results as they finish and calling ``advance(weight)`` after each.

    A worker that dies breaks the whole pool. Then the pool is restarted and the unfinished tasks
    are run again; if the pool breaks again they are run one at a time, and a task that still kills
    its worker is handed to ``crashed``, which yields results that report it (so that bad input
    never stops the stage) or raises. An exception raised by ``fn`` itself propagates.
    """
    weights = [1] * len(args) if weights is None else list(weights)
    if pool is None:
        for a, w in zip(args, weights, strict=True):
            result = fn(*a)
            advance(w)
            yield result
        return
    pending = dict(enumerate(args))
    for attempt in range(2):
        futures = {pool.executor.submit(fn, *pending[i]): i for i in sorted(pending)}
        try:
            for fut in as_completed(futures):
                i = futures[fut]
                result = fut.result()
                del pending[i]
                advance(weights[i])
                yield result
            return
        except BrokenProcessPool:
            log.error(
                "a worker process died (attempt %d); restarting the pool for %d unfinished task(s)",
                attempt + 1,
                len(pending),
            )
            pool.restart()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    for i in sorted(pending):  # isolate the culprit: one task at a time
        try:
            results = [pool.executor.submit(fn, *pending[i]).result()]
        except BrokenProcessPool:
            pool.restart()
            results = list(crashed(pending[i]))
        advance(weights[i])
        yield from results
