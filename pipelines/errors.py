"""The errors the command line maps to its exit codes (besides ``config.ConfigError``).

Imports nothing: ``run_video.py`` catches these before it imports torch, so that ``--help``, a bad command
line and a config error return without it. Each class is also reachable where it was first defined
(``pipelines.job.UsageError``, ``pipelines.video_io.InputError``, ``pipelines.checkpoint.WorkdirMismatch``,
``pipelines.video_writer.WriteError`` and ``OutputAppeared``): the same class, re-exported.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A bad command line or path: printed as ``error: <message>``, exit code 2."""


class InputError(ValueError):
    """Bad user input: the CLI prints str(e) as a one-line error and exits with code 2."""


class WorkdirMismatch(ValueError):
    """The work folder belongs to another run configuration."""


class WriteError(RuntimeError):
    """The output could not be written or verified; nothing was replaced."""


class OutputAppeared(WriteError):
    """Another process created the output path during the run (no-replace commit); it was kept."""
