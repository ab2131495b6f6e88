"""Resumable sampling: the loop's whole state after a step, saved atomically to a work folder.

The state is the samples and x0 estimates ``(F, C, h, w)``, every frame generator's state and the
scheduler's mutable attributes (step counter, DPM-Solver's model-output history), so a killed
run restarted with the same command continues bit-identically. Safetensors + JSON, no pickles.
A work folder made by a different configuration is refused.
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import WorkdirMismatch  # defined there: the command line catches it before importing torch
from .video_writer import WriteError, ordinary_mode


@contextmanager
def workdir_lock(workdir: Path | None):
    """Hold an flock on the work folder itself while a run uses it (released when the process ends, however
    it ends): a second run on the same folder would overwrite the first one's checkpoints mid-save. A folder
    this call had to make is removed again if the run leaves it empty (an error before sampling writes
    nothing). A folder that cannot be made is not locked here (the checks that follow say what is wrong with
    it), nor one on a file system without flock (some network mounts), which runs as before."""
    fd, made = None, []
    if workdir is not None:
        try:
            made = [p for p in (workdir, *workdir.absolute().parents) if not p.exists()]  # made here, deepest first
            workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkdirMismatch(f"--workdir {workdir} is in use by another run; wait for it to end or use "
                                      "another folder") from None
            except OSError:
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)
        for folder in made:  # the folders made here that the run left empty, deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def _scheduler_state(scheduler) -> tuple[dict, dict]:
    """Split the scheduler's attributes into tensors and JSON-able values (lists of tensors allowed)."""
    tensors, plain = {}, {}
    for k, v in vars(scheduler).items():
        if k == "config" or k.startswith("__"):
            continue
        if isinstance(v, torch.Tensor):
            tensors[f"sched.{k}"] = v.detach().cpu().contiguous()
            plain[k] = {"tensor": True}
        elif isinstance(v, (list, tuple)) and v and all(x is None or isinstance(x, torch.Tensor) for x in v):
            plain[k] = {"list": len(v), "none": [x is None for x in v]}
            for i, x in enumerate(v):
                if x is not None:
                    tensors[f"sched.{k}.{i}"] = x.detach().cpu().contiguous()
        elif v is None or isinstance(v, (bool, int, float, str)):
            plain[k] = {"value": v}
    return tensors, plain


def _restore_scheduler(scheduler, tensors: dict, plain: dict, device) -> None:
    for k, spec in plain.items():
        if "tensor" in spec:
            current = getattr(scheduler, k, None)  # keep tensors where the scheduler keeps them (Euler: CPU sigmas)
            setattr(scheduler, k, tensors[f"sched.{k}"].to(current.device if isinstance(current, torch.Tensor)
                                                            else device))
        elif "list" in spec:
            setattr(scheduler, k, [None if none else tensors[f"sched.{k}.{i}"].to(device)
                                   for i, none in enumerate(spec["none"])])
        else:
            setattr(scheduler, k, spec["value"])


class Checkpointer:
    """Save the sampling state every ``every`` steps into ``workdir``; ``load`` returns the last one."""

    def __init__(self, workdir: str | Path, fingerprint: str, every: int = 1):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1, not {every}")
        self.dir, self.every = Path(workdir), every
        self.verify(self.dir, fingerprint)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "run.json"
        if not meta.exists():
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": fingerprint}))
            os.replace(tmp, meta)

    @staticmethod
    def verify(workdir: str | Path, fingerprint: str | None) -> None:
        """Raise WorkdirMismatch if ``workdir`` (or a window folder in it) belongs to another run (``None``: only
        if it is not a work folder); reads only, so a command can check before doing any work."""
        workdir = Path(workdir)
        if workdir.exists() and not workdir.is_dir():
            raise WorkdirMismatch(f"--workdir {workdir} exists and is not a folder")
        metas = [m for m in [workdir / "run.json", *workdir.glob("*/run.json")] if m.exists()]
        # the user's own folder is never mixed into (hidden files, a fresh mount's lost+found, a run.json cut
        # short before its rename and the job's notes on the machine and outputs do not make a folder the user's)
        ours = ("lost+found", "run.tmp", "machine.json", "outputs.json")  # (pipelines.job's notes)
        theirs = [] if metas or not workdir.is_dir() else \
            [q for q in workdir.iterdir() if not q.name.startswith(".") and q.name not in ours]
        if theirs:
            raise WorkdirMismatch(f"--workdir {workdir} holds other files and is not a work folder (no run.json); "
                                  "use a new or empty folder")
        for meta in metas:
            try:
                found = json.loads(meta.read_text()).get("fingerprint")
            except (ValueError, AttributeError, OSError) as e:
                raise WorkdirMismatch(f"work folder {workdir}: {meta.name} is unreadable ({type(e).__name__}); "
                                      "delete the folder or use another --workdir") from e
            if fingerprint is not None and found != fingerprint:
                raise WorkdirMismatch(f"work folder {workdir} was made by a different configuration or input "
                                      "(or an earlier version of this program); use another --workdir or delete it")

    @property
    def state_file(self) -> Path:
        return self.dir / "state.safetensors"

    def has_state(self) -> bool:
        return self.state_file.exists()

    def save(self, step: int, x, x0_buf, generators, scheduler) -> None:
        """``step``: number of completed denoising steps. Samples kept in files (a SteppedState) are
        flushed there, not copied: they must then be saved after every step (see ``maybe_save``)."""
        tensors, plain = _scheduler_state(scheduler)
        tensors["x0"] = x0_buf.detach().cpu().contiguous()
        if hasattr(x, "flush"):
            x.flush()
        else:
            tensors["x"] = x.detach().cpu().contiguous()
        for i, g in enumerate(generators):
            tensors[f"gen.{i}"] = g.get_state()
        meta = {"step": str(step), "scheduler": json.dumps(plain)}
        tmp = self.state_file.with_suffix(".tmp")
        try:
            save_file(tensors, tmp, metadata=meta)
            ordinary_mode(tmp)  # safetensors writes 0600
        except Exception as e:  # safetensors reports a full disk as its own error
            tmp.unlink(missing_ok=True)
            raise WriteError(f"{tmp}: saving the checkpoint failed ({e}); the previous one is kept") from e
        os.replace(tmp, self.state_file)

    def maybe_save(self, step: int, total: int, *state) -> None:
        # double-buffered file state is overwritten two steps later: it is only resumable step by step
        if step % self.every == 0 or step == total or hasattr(state[0], "flush"):
            self.save(step, *state)

    def load(self, generators, scheduler, device):
        """Restore generators and scheduler in place; return (step, x, x0) or None when starting fresh."""
        if not self.state_file.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(self.state_file, framework="pt") as f:
                meta = f.metadata()
            tensors = load_file(self.state_file)
            for i, g in enumerate(generators):
                g.set_state(tensors[f"gen.{i}"])
            _restore_scheduler(scheduler, tensors, json.loads(meta["scheduler"]), device)
            x = tensors["x"].to(device) if "x" in tensors else None  # None: the samples are in their files
            return int(meta["step"]), x, tensors["x0"].to(device)
        except Exception as e:  # truncated, foreign or damaged state: say so, never resume from it
            raise WorkdirMismatch(f"work folder {self.dir}: {self.state_file.name} is damaged or from another "
                                  f"run ({type(e).__name__}); delete it to start over") from e
