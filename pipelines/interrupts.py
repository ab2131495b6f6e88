"""Ctrl-C, however it arrives: the CLI's exit code 130 must not depend on where the signal lands.

Imports nothing heavy (the CLI calls :func:`watch` before importing torch and diffusers). Two records of a
Ctrl-C, because either can be lost: the flag our handler sets (lost when running the Python handler itself
fails, or when an import swallows the KeyboardInterrupt it raises), and the byte CPython's C-level handler
writes to a signal wakeup pipe before any Python code runs.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

INTERRUPTED = False  # Ctrl-C seen: any error after it is reported as the interrupt
TERMINATED = False  # SIGTERM seen while the libraries loaded (the CLI's own handler takes over after)
_ARMED = False  # see arm()
_WAKE = None  # read end of the signal wakeup pipe: Python's C-level handler writes each signal's number there


def _on_sigint(signum, frame):
    """Ctrl-C: remember it, then raise KeyboardInterrupt as Python's own handler does. A library may turn the
    KeyboardInterrupt into another error on its way up (diffusers' lazy imports turned one raised mid-import
    into a RuntimeError), and the flag still says what happened."""
    global INTERRUPTED
    INTERRUPTED = True
    if _ARMED:  # while the libraries load, only record it: an exception raised inside torch's C++ import
        raise KeyboardInterrupt  # callbacks aborts the process (CI saw pybind11 terminate on one)


def _on_sigterm_early(signum, frame):
    """SIGTERM while the libraries load: only recorded (the CLI then exits 143 with its one line; the default
    action killed the process without a word)."""
    global TERMINATED
    TERMINATED = True


def release_sigterm() -> None:
    """Give SIGTERM its default action back where :func:`watch` only recorded it (the CLI's ``main`` then
    installs its own handler)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _on_sigterm_early:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def arm() -> None:
    """From now on Ctrl-C raises KeyboardInterrupt; before, it is only recorded (the caller checks
    :func:`interrupted` once its imports are done)."""
    global _ARMED
    _ARMED = True


def interrupted() -> bool:
    """Whether Ctrl-C arrived: the handler's flag, or the SIGINT byte in the wakeup pipe, which the C-level
    handler writes before any Python code runs (so it is there even when running the Python handler itself
    failed, as with a RecursionError when the signal landed deep inside an import)."""
    global INTERRUPTED
    if not INTERRUPTED and _WAKE is not None:
        try:
            INTERRUPTED = bytes([signal.SIGINT]) in os.read(_WAKE, 4096)
        except BlockingIOError:
            pass
    return INTERRUPTED


def watch() -> None:
    """Our SIGINT handler where Python's default one is set (SIGINT left ignored under nohup or &) and a
    wakeup pipe where no one else has one; the main thread only, as the signal module requires."""
    global _WAKE
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm_early)
    if _WAKE is None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        if previous == -1:
            _WAKE = r
        else:  # someone else's wakeup fd (an event loop): put it back
            signal.set_wakeup_fd(previous)
            os.close(r)
            os.close(w)


class _Forgiving:
    """A standard stream whose reader may go away (``| head``): that ends the messages, not the job (the
    stream then writes to the null device)."""

    def __init__(self, stream):
        self.stream = stream

    def _drop(self) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):  # no file descriptor behind it: nothing to redirect
            pass

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._drop()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def forgive_closed_readers() -> None:
    """The process's stdout and stderr outlive their readers (see :class:`_Forgiving`). A stream closed
    before the start (``>&-``: Python's is None, and print writes nothing) is left as it is."""
    if sys.stdout is not None:
        sys.stdout = _Forgiving(sys.stdout)
    if sys.stderr is not None:
        sys.stderr = _Forgiving(sys.stderr)


@contextmanager
def deferred():
    """Ctrl-C and SIGTERM wait until the block ends (a job's last moves of its outputs into place), then act
    as usual: their handlers are swapped for ones that only record them, and each recorded signal is raised
    again once the usual handlers are back. Only the main thread can do this; elsewhere they act at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def import_held(name: str):
    """The module ``name``, imported with Ctrl-C and SIGTERM held until the import ends (:func:`deferred`), then
    acted on as usual: one raised inside torch's C++ import callbacks can abort the process."""
    import importlib

    with deferred():
        return importlib.import_module(name)
