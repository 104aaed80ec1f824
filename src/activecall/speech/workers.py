"""Named thread pools for CPU-heavy speech work that releases the GIL (onnxruntime, CTranslate2).

Not the reactor's pool (DNS and others share it).  Each pool has at most one thread per CPU (up to 4),
starts on first use and stops at reactor shutdown.
"""

from __future__ import annotations

import os

_pools: dict = {}


def pool_size() -> int:
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except AttributeError:
        return max(1, min(4, os.cpu_count() or 1))


def _pool(name: str):
    pool = _pools.get(name)
    if pool is None:
        from twisted.internet import reactor
        from twisted.python.threadpool import ThreadPool
        pool = _pools[name] = ThreadPool(minthreads=0, maxthreads=pool_size(), name=name)
        pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", stop, name)
    return pool


def stop(name: str) -> None:
    pool = _pools.pop(name, None)
    if pool is not None:
        pool.stop()


def run_in(name: str, f, *args):
    """``f(*args)`` on the pool ``name``; a Deferred of its result."""
    from twisted.internet import reactor, threads
    return threads.deferToThreadPool(reactor, _pool(name), f, *args)
