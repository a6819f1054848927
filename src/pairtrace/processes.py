"""Child processes that end with their parent: worker pools and launched programs.

A SIGTERM (``kill <pid>``, a scheduler stopping a job) or a SIGHUP (the terminal closed) ends a Python process
without any of its clean-up, so the workers of a ``concurrent.futures`` process pool and the programs it started
with ``subprocess`` were left running, re-parented to init: a retrain went on writing into a run folder nobody was
watching, an ``accelerate launch`` went on holding its GPUs. Ctrl-C was never affected (it reaches the whole
process group).

Every process pool of the package comes from :func:`spawn_pool` and every long-lived program it launches is
registered with :func:`own`. On SIGTERM or SIGHUP, a process that went through either of them first terminates its
children (a pool's workers do the same for theirs: the handler is their pool initializer), waits a few seconds,
kills what is left, and then dies of the same signal, so its exit status is what it would have been without the
handler. A signal the process already handles or ignores (``nohup`` ignores SIGHUP) is left alone. A parent killed
with SIGKILL runs no handler; its pool workers notice within a second that they were orphaned, end their own
children and exit.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

TERMINATION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGHUP)
"""Signals after which the children are ended first (SIGINT is left to Python's KeyboardInterrupt)."""

GRACE_S = 10.0
"""How long children get to exit after their SIGTERM before they are killed."""

PARENT_POLL_S = 1.0
"""How often a pool worker checks that its parent is still alive."""

_owned: set[subprocess.Popen] = set()
_owned_lock = threading.Lock()


def own(process: subprocess.Popen) -> subprocess.Popen:
    """Register a launched program to be terminated if this process is; returns it (see :func:`release`)."""
    with _owned_lock:
        _owned.add(process)
    end_children_on_termination()
    return process


def release(process: subprocess.Popen) -> None:
    """Forget a program registered with :func:`own` (it has exited, or it is stopped by its owner)."""
    with _owned_lock:
        _owned.discard(process)


@contextmanager
def owned(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """:func:`own` the program for the ``with`` block, then :func:`release` it; if the block raises (Ctrl-C, an
    error), the program is killed first, as ``subprocess.run`` does."""
    own(process)
    try:
        yield process
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        release(process)


def spawn_pool(max_workers: int) -> cf.ProcessPoolExecutor:
    """A process pool of fresh interpreters (``spawn``: no forked torch state) whose workers end with this process.

    Args:
        max_workers: Worker processes.

    Returns:
        The pool; use it as a context manager or call ``shutdown``.
    """
    end_children_on_termination()
    return cf.ProcessPoolExecutor(max_workers=max_workers, mp_context=mp.get_context("spawn"),
                                  initializer=_init_worker, initargs=(os.getpid(),))


def end_children_on_termination() -> None:
    """Install the handler that ends this process's children on SIGTERM / SIGHUP (see the module docstring).

    Idempotent; does nothing off the main thread (Python delivers signals to the main thread only) and leaves a
    signal alone that already has a handler or is ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in TERMINATION_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _end_children_then_die)


def end_children(grace_s: float = GRACE_S) -> None:
    """Terminate every child (pool workers and other ``multiprocessing`` children, programs registered with
    :func:`own`), wait up to ``grace_s`` seconds in all, and kill those still running."""
    workers = mp.active_children()
    with _owned_lock:
        programs = [p for p in _owned if p.poll() is None]
    for child in workers:
        child.terminate()
    for program in programs:
        program.terminate()
    deadline = time.monotonic() + grace_s
    for child in workers:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(1.0)
    for program in programs:
        try:
            program.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            program.kill()


def _init_worker(parent_pid: int) -> None:
    """A pool worker's start: the signal handler, and a watch on its parent (a parent killed with SIGKILL, or by
    the out-of-memory killer, runs no handler; its workers would otherwise sit idle forever once their task ends)."""
    end_children_on_termination()
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="pairtrace-parent-watch",
                     daemon=True).start()


def _exit_when_orphaned(parent_pid: int, every_s: float = PARENT_POLL_S) -> None:
    while os.getppid() == parent_pid:
        time.sleep(every_s)
    end_children()
    os._exit(128 + signal.SIGTERM)  # its task's result has no one to go to


def _end_children_then_die(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the clean-up short
    end_children()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
