"""The ends of iterations: run where waiting for threads and taking locks is safe.

An iteration the caller drops ends in its generators' ``finally`` blocks: they cancel the
transfers, shut the thread pools down and wait for their threads. When the iterator is
dropped in a reference cycle, the garbage collector runs those blocks on whatever thread
happens to allocate next: maybe one holding a lock of the SDK's (a plain lock, which the
cleanup then waits for forever), or a thread still starting, inside ``threading``'s own
lock that waiting for a thread needs; and maybe a thread of the very pool being shut
down, which cannot wait for itself. There, the cleanup is handed to a thread of its own
instead, which lives while any iteration does.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from threading import current_thread
from typing import Any

from . import config

log = logging.getLogger(__name__)

_IDLE_SECONDS = 0.5  # the cleanup thread ends this long after the last iteration's end
_STOP_SECONDS = 5.0  # the longest the end of the last iteration waits for it to end

_finalizing = sys.is_finalizing  # (a test stands in for it)
_state = threading.local()  # .collecting: this thread is inside a garbage collection
_queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()  # put() is reentrant
_lock = threading.Lock()
_live = 0  # iterations begun and not yet cleaned up
_thread: threading.Thread | None = None
_stopping = threading.Event()  # set to end _thread


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    _state.collecting = phase == "start"


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) has none of its parent's threads, and a lock a
    parent thread held at the fork would never be released here."""
    global _queue, _lock, _live, _thread, _stopping
    _queue, _lock, _live, _thread = queue.SimpleQueue(), threading.Lock(), 0, None
    _stopping = threading.Event()


gc.callbacks.append(_on_collection)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def begun() -> int:
    """An iteration begins (on its caller's thread, a safe place to start a thread): the
    cleanup thread is there until it has ended. Returns what :func:`end` takes, once."""
    global _live, _thread, _stopping
    with _lock:
        _live += 1
        if _thread is None or not _thread.is_alive():
            _stopping = threading.Event()
            _thread = threading.Thread(
                target=_run,
                args=(_stopping,),
                name=f"{config.THREAD_PREFIX}cleanup",
                daemon=True,
            )
            _thread.start()
    return os.getpid()


def end(cleanup: Callable[[], None], begun_in: int) -> None:
    """Run an iteration's ``cleanup`` now where it may wait and lock, else on the cleanup
    thread (inside a garbage collection, or on a thread of the SDK's own). Nothing for the
    copy a forked child (a DataLoader worker) has of its parent's iteration: it has none of
    its threads, and closing its connections would shut down the parent's sockets."""
    if os.getpid() != begun_in:
        return

    def counted() -> None:
        global _live, _thread
        try:
            cleanup()
        finally:
            idle = None
            with _lock:
                _live -= 1
                if _live <= 0 and _thread is not None and _thread is not current_thread():
                    # The last iteration has ended here: so has the cleanup thread when
                    # this returns (no thread left behind), and an iteration begun from
                    # now on starts another. (Its own event: a thread started meanwhile
                    # may take the wake-up, never the stop.)
                    idle, _thread = _thread, None
                    _stopping.set()
                    _queue.put(_wake)
            # (Not as the interpreter exits, finalizing a generator a script left: from
            # Python 3.13 the daemon thread never runs again, and the exit waited 5 s.)
            if idle is not None and not _finalizing():
                idle.join(_STOP_SECONDS)

    if _may_wait():
        counted()
    else:
        _queue.put(counted)


def _wake() -> None:
    """Queued to have an idle cleanup thread look at its stop event."""


def _may_wait() -> bool:
    if getattr(_state, "collecting", False):
        return False
    current = current_thread()
    return current is _thread or not current.name.startswith(config.THREAD_PREFIX)


def _run(stopping: threading.Event) -> None:
    global _thread
    while not stopping.is_set():
        try:
            cleanup = _queue.get(timeout=_IDLE_SECONDS)
        except queue.Empty:
            with _lock:
                if _live <= 0 and _queue.empty() and _thread is current_thread():
                    _thread = None
                    return
            continue
        try:
            cleanup()
        except Exception:  # one failure must not keep the others from running
            log.debug("an iteration's cleanup failed", exc_info=True)
