"""The cleanup thread that ends iterations the garbage collector drops (pixcrawler.cleanup)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from helpers import settles
from pixcrawler import cleanup

pytestmark = pytest.mark.timeout(60)


def cleanup_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pixcrawler-cleanup"]


def test_iterations_ending_on_several_threads_at_once_never_wait_for_ever() -> None:
    """The end of the last iteration stops the idle cleanup thread and waits for it; an
    iteration begun meanwhile on another thread started a second one, which could take
    the stop meant for the first: the first never ended, and neither did the wait."""
    stop = time.monotonic() + 2.0
    rounds = [0] * 4

    def loop(slot: int) -> None:
        while time.monotonic() < stop:
            cleanup.end(lambda: None, cleanup.begun())
            rounds[slot] += 1

    threads = [threading.Thread(target=loop, args=(slot,), daemon=True) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert not [t for t in threads if t.is_alive()], "an iteration's end waited for ever"
    assert min(rounds) > 0
    assert settles(lambda: not cleanup_threads(), 5)


def test_a_forked_childs_copy_of_its_parents_iteration_is_left_alone() -> None:
    """A DataLoader worker (forked) may collect its copy of an iteration its parent had
    dropped: running that cleanup there would close copies of the parent's connections,
    and counting it off left the child's own iterations uncounted."""
    ran = []
    begun_in = cleanup.begun()
    cleanup.end(lambda: ran.append("copy"), begun_in + 1)  # as a child sees its copy
    assert ran == []
    cleanup.end(lambda: ran.append("ended"), begun_in)
    assert ran == ["ended"]
    assert settles(lambda: not cleanup_threads(), 5)
    assert os.getpid() == begun_in


def test_the_last_iteration_ending_as_the_interpreter_exits_does_not_wait_for_the_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A script that ended holding an iterator: its generator is finalized at exit, and from
    Python 3.13 a daemon thread no longer runs then, so the wait for the cleanup thread
    took its whole 5 s, every time."""
    busy, release = threading.Event(), threading.Event()
    begun_in = cleanup.begun()
    cleanup._queue.put(lambda: (busy.set(), release.wait(30)))  # the thread cannot end
    assert busy.wait(10)
    monkeypatch.setattr(cleanup, "_finalizing", lambda: True)
    started = time.monotonic()
    cleanup.end(lambda: None, begun_in)
    waited = time.monotonic() - started
    release.set()
    assert waited < 1.0, f"the end waited {waited:.1f} s for a thread that cannot run"
    monkeypatch.undo()
    assert settles(lambda: not cleanup_threads(), 5)
