"""What the latent model's training scripts share: device choice, a resumable run folder (weights and
AdamW state as safetensors, ``state.json``, ``log.csv``), EMA, atomic folder export and the plots."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipelines.video_writer import ordinary_mode


class TrainError(Exception):
    """Bad input to a training script: :func:`entry` prints one line and exits with code 2."""


def entry(main) -> None:
    """``if __name__ == "__main__": entry(main)``: bad input (TrainError) is one line on stderr and exit 2,
    Ctrl-C exit 130; anything else is an internal error and keeps its traceback (exit 1)."""
    import sys

    try:
        main()
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted (the run resumes from its last checkpoint)", file=sys.stderr, flush=True)
        sys.exit(130)


def parser(doc: str, run: Path, steps: int, batch: int, crop: int, lr: float):
    """The options every training script takes (its own are added by the caller); ``--out`` defaults to
    ``<run>/export`` (see :func:`setup`)."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=run, help="checkpoint folder (resumed when it holds a run)")
    p.add_argument("--out", type=Path, default=None, help="the exported model folder (default: <run>/export)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--crop", type=int, default=crop, help="ground-truth crop side in pixels")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--every", type=int, default=250, help="validate, checkpoint and export every N steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="stop (validating, saving and exporting) after this many minutes (0: no limit); a session "
                        "that was killed, resumed with the same value, continues its budget and lr schedule")
    p.add_argument("--workers", type=int, default=0, help="threads preparing batches ahead (0: inline)")
    return p


def pick_device(name: str) -> torch.device:
    """``auto``: the accelerator when one is present (CUDA, ...), else the CPU; otherwise ``name`` itself,
    which must name a device this machine has (TrainError)."""
    if name == "auto":
        return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type != "cpu":
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if acc is None or acc.type != device.type:
            raise TrainError(f"--device {name}: this machine has no {device.type} device (use auto or cpu)")
        if device.index is not None and device.index >= torch.accelerator.device_count():
            raise TrainError(f"--device {name}: this machine has {torch.accelerator.device_count()} {device.type} "
                             "device(s)")
    return device


def _check(ok: bool, flag: str, expected: str, value) -> None:
    if not ok:
        raise TrainError(f"{flag} must be {expected}, got {value}")


def check_args(args, crop_multiple: int = 16) -> None:
    """Range checks of the shared options (TrainError naming the flag)."""
    _check(args.steps >= 1, "--steps", ">= 1", args.steps)
    _check(args.batch >= 1, "--batch", ">= 1", args.batch)
    _check(args.crop >= crop_multiple and args.crop % crop_multiple == 0, "--crop",
           f"a multiple of {crop_multiple}", args.crop)
    _check(args.lr > 0, "--lr", "> 0", args.lr)
    _check(args.every >= 1, "--every", ">= 1", args.every)
    _check(args.minutes >= 0, "--minutes", ">= 0 (0: no limit)", args.minutes)
    _check(args.threads >= 0, "--threads", ">= 0 (0: torch default)", args.threads)
    _check(args.workers >= 0, "--workers", ">= 0", args.workers)


def local_folder(path: Path | None, flag: str) -> Path | None:
    """``path`` when it is an existing folder (None passes); else TrainError. Training reads local
    folders only: a mistyped path must not turn into a Hugging Face hub lookup."""
    if path is not None and not Path(path).is_dir():
        raise TrainError(f"{flag} {path}: no such folder")
    return path


def check_out(out: Path, run: Path, **inputs: Path | None) -> None:
    """An export replaces the whole ``out`` folder: refuse one that is, holds or sits inside the run folder
    or an input (``flag=path``), and an existing folder that is not an earlier export (TrainError)."""
    o = Path(out).resolve()
    for flag, path in [("--run", run), *((f"--{k.replace('_', '-')}", v) for k, v in inputs.items())]:
        if path is None:
            continue
        q = Path(path).resolve()
        inside_run = flag == "--run" and q in o.parents  # <run>/export: the default
        if not inside_run and (o == q or o in q.parents or q in o.parents):
            raise TrainError(f"--out {out} overlaps {flag} {path}: the export replaces the whole --out folder")
    if o.is_file():
        raise TrainError(f"--out {out} is a file; give a folder for the exported model")
    if o.is_dir() and any(o.iterdir()) and not _looks_exported(o):
        raise TrainError(f"--out {out} holds other files and is not an exported model; use a new folder")


def _looks_exported(folder: Path) -> bool:
    """What the exports write at the top of ``--out``: one diffusers model (config.json) or a model folder
    (vsr_config.json); a folder merely holding models somewhere below is not one."""
    return any((folder / n).is_file() for n in ("config.json", "vsr_config.json", "model_index.json"))


CHECKPOINT = re.compile(r"checkpoint-\d{8}(\.tmp)?")
# what a run folder holds before its first save (a run killed then): nothing of the user's
OWN_BEFORE_SAVE = ("log.csv", "_tokenizer_files", "state.json.tmp")


def setup(args, crop_multiple: int = 16, **inputs: Path | None) -> torch.device:
    """Checks (the shared options, ``--out`` against the run folder and the ``inputs`` given as
    ``flag=path``), threads, seed, the run folder; returns the device (the accelerator when present and
    ``--device auto``). Sets ``args.out`` to ``<run>/export`` when it was not given."""
    check_args(args, crop_multiple)
    if args.run.exists() and not args.run.is_dir():
        raise TrainError(f"--run {args.run} is a file; give a folder for the run's checkpoints")
    if args.out is None:
        args.out = args.run / "export"
    check_out(args.out, args.run, **inputs)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.run.mkdir(parents=True, exist_ok=True)
    return device


def step_randomness(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The data (numpy) and noise (torch) generators of one training step: they depend only on
    (seed, step), so a resumed run draws exactly what an uninterrupted one would."""
    return np.random.default_rng([seed, step]), torch.Generator().manual_seed(seed * 1_000_003 + step)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, clip: float | None = 1.0) -> None:
    """Backpropagate ``loss`` and take one step, clipping the gradient norm of ``params`` to ``clip``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def rescaled_crop(img: torch.Tensor, rng: np.random.Generator, crop: int, smallest: float) -> torch.Tensor:
    """A random ``crop`` x ``crop`` window of ``img`` (..., 3, H, W: one image, or frames stacked to share
    the window) seen at a random bicubic scale s in [smallest, 1) (never below the image's own size): the
    window of side crop / s is cut first and then resized, so the cost does not grow with the image."""
    from pipelines.degradation import bicubic_resize

    s = rng.uniform(smallest, 1.0)
    h, w = img.shape[-2:]
    s = max(s, crop / min(h, w))
    side = min(h, w, int(round(crop / s)))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    window = img[..., y:y + side, x:x + side]
    return window if side == crop else bicubic_resize(window, (crop, crop)).clamp(-1, 1)


def prefetch(make, start: int, workers: int = 0, ahead: int = 8):
    """Yield ``make(step)`` for step = start, start + 1, ..., computed ``ahead`` steps early on ``workers``
    threads (0: inline). Each batch depends only on its step, so the stream is the same either way."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if workers <= 0:
        step = start
        while True:
            yield make(step)
            step += 1
    with ThreadPoolExecutor(workers) as pool:
        queue, nxt = deque(), start
        while True:
            while len(queue) < ahead:
                queue.append(pool.submit(make, nxt))
                nxt += 1
            yield queue.popleft().result()


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """AdamW state as safetensors (no pickles in the repository): per parameter i, ``i.exp_avg``,
    ``i.exp_avg_sq`` and ``i.step``."""
    tensors = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    save_file(tensors, path)


def load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    """Restore :func:`save_optimizer`'s file (or an older ``last_opt.pt``)."""
    st = folder / "last_opt.safetensors"
    if not st.exists():
        opt.load_state_dict(torch.load(folder / "last_opt.pt", weights_only=True))
        return
    tensors = load_file(st)
    for i, p in enumerate(opt.param_groups[0]["params"]):
        state = {k.split(".", 1)[1]: v.to(p.device) for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        if state:
            opt.state[p] = state


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Run:
    """A resumable run in ``folder``: ``models`` (name -> module) and the optimizer saved as safetensors in
    ``checkpoint-<step>/``, ``state.json`` (step, seconds, the checkpoint's name, the script and options,
    the time budget) and ``log.csv`` with ``columns``. A save is atomic: the new checkpoint folder is
    complete before ``state.json`` (written by rename) names it, and only then is the old one deleted."""

    def __init__(self, folder: Path, models: dict, opt: torch.optim.Optimizer, columns: list[str],
                 script: str | None = None, options: dict | None = None, minutes: float = 0.0):
        self.folder, self.models, self.opt = Path(folder), models, opt
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta_path, self.log_csv = self.folder / "state.json", self.folder / "log.csv"
        self.step, self.meta = 0, {}
        options = {k: str(v) for k, v in (options or {}).items()}
        resumed = self.meta_path.exists()
        foreign = sorted(q.name for q in self.folder.iterdir()
                         if not (q.name in OWN_BEFORE_SAVE or CHECKPOINT.fullmatch(q.name)))
        if not resumed and foreign:
            raise TrainError(f"--run {self.folder} holds other files ({foreign[0]}...) and is not a run folder (no "
                             "state.json); use a new or empty folder")
        if resumed:
            self._resume(script, options)
        self.meta.update(script=script, options=options)
        self.session_start = self.step
        if resumed and self.log_csv.exists():
            self._drop_rows_after(self.step)
        elif self.log_csv.exists():  # a run killed before its first checkpoint: its rows are not resumed
            self.log_csv.unlink()
        new_log = not self.log_csv.exists()
        self._file = self.log_csv.open("a", newline="")
        self.writer = csv.writer(self._file)
        if new_log:
            self.writer.writerow(columns)
        self.t_session = time.time()
        self.t_start = self.t_session - self.meta.get("seconds", 0.0)
        budget = self.meta.get("budget") or {}
        if minutes > 0 and budget.get("minutes") == minutes and not budget.get("ended") \
                and budget.get("used", 0.0) < 60 * minutes:
            self.t_session -= budget["used"]  # a session stopped early: its time budget (and lr schedule) goes on
            print(f"continuing the {minutes:g}-minute budget ({budget['used'] / 60:.1f} min used)", flush=True)
        self.minutes = minutes

    def _resume(self, script: str | None, options: dict) -> None:
        try:
            self.meta = json.loads(self.meta_path.read_text())
            self.step = int(self.meta["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise TrainError(f"--run {self.folder}: state.json is damaged ({type(e).__name__}); delete the "
                             "folder or use another --run") from None
        made_by = self.meta.get("script")
        if script and made_by and made_by != script:
            raise TrainError(f"--run {self.folder} is a {made_by} run, not a {script} one; use another --run")
        src = self.folder / self.meta["checkpoint"] if "checkpoint" in self.meta else self.folder  # older runs
        for name, m in self.models.items():
            f = src / f"last_{name}.safetensors"
            if not f.is_file():
                raise TrainError(f"--run {self.folder}: {f.relative_to(self.folder)} is missing; delete the folder "
                                 "or use another --run")
            try:
                m.load_state_dict(load_file(f))
            except RuntimeError as e:  # other layer names or shapes
                first = str(e).strip().splitlines()[0]
                raise TrainError(f"--run {self.folder} holds a different {name} than these options build "
                                 f"({first}); use the options it was made with, or another --run") from None
        load_optimizer(self.opt, src)
        changed = {k: (self.meta.get("options", {}).get(k), v) for k, v in options.items()
                   if k in self.meta.get("options", {}) and self.meta["options"][k] != v}
        print(f"resumed from step {self.step}" + ("; changed options: " + ", ".join(
            f"{k} {a} -> {b}" for k, (a, b) in changed.items()) if changed else ""), flush=True)

    def _drop_rows_after(self, step: int) -> None:
        """Drop the log rows of steps after ``step`` (the saved one), and a last row cut short, which a run
        stopped between two saves can leave once its log buffer has reached the disk, so that a resumed
        log has each step once (the first column is the step)."""
        text = self.log_csv.read_text()
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        kept = "".join(lines[:1] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) <= step])
        if kept != text:
            tmp = self.log_csv.with_suffix(".csv.tmp")
            tmp.write_text(kept)
            tmp.replace(self.log_csv)

    def finished(self, steps: int, minutes: float) -> bool:
        """True once ``steps`` are done, or this session has run ``minutes`` (0: no time limit) and made at
        least one step (so it always ends validated, saved and exported)."""
        timed_out = minutes > 0 and time.time() - self.t_session > 60 * minutes and self.step > self.session_start
        done = self.step >= steps or timed_out
        if done and "budget" in self.meta and not self.meta["budget"].get("ended") and self.meta_path.exists():
            self.meta["budget"]["ended"] = True  # the session ended as planned: a resume starts a new budget
            self._write_meta()
        return done

    def progress(self, steps: int, minutes: float) -> float:
        """How far through the run, in [0, 1]: by steps, or by the time budget when that ends it first (a
        session that stopped early and resumes with the same ``--minutes`` continues its budget)."""
        by_time = (time.time() - self.t_session) / (60 * minutes) if minutes > 0 else 0.0
        return min(1.0, max(self.step / steps, by_time))

    def seconds(self) -> float:
        return time.time() - self.t_start

    def cosine(self, steps: int, minutes: float) -> float:
        """Learning-rate factor 0.5 + 0.5 cos(pi p), p = :meth:`progress`: 1 at the start, 0 at the end."""
        return 0.5 + 0.5 * math.cos(math.pi * self.progress(steps, minutes))

    @property
    def checkpoint_dir(self) -> Path:
        """The folder of the last saved weights."""
        return self.folder / self.meta["checkpoint"] if "checkpoint" in self.meta else self.folder

    def save(self) -> None:
        """Weights, optimizer and state after ``self.step`` steps, atomically; flushes the log."""
        name = f"checkpoint-{self.step:08d}"
        tmp = self.folder / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for key, m in self.models.items():
            save_file(m.state_dict(), tmp / f"last_{key}.safetensors")
        save_optimizer(self.opt, tmp / "last_opt.safetensors")
        ordinary_mode(tmp)  # safetensors writes 0600
        for f in tmp.iterdir():
            _fsync(f)
        if (self.folder / name).exists():
            shutil.rmtree(self.folder / name)
        os.replace(tmp, self.folder / name)
        self.meta.update(step=self.step, seconds=self.seconds(), checkpoint=name)
        if self.minutes > 0:
            self.meta["budget"] = {"minutes": self.minutes, "used": time.time() - self.t_session}
        else:
            self.meta.pop("budget", None)
        self._write_meta()  # the commit point
        for old in self.folder.iterdir():
            if CHECKPOINT.fullmatch(old.name) and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        old_layout = [self.folder / f"last_{key}.safetensors" for key in self.models]
        for old in [*old_layout, self.folder / "last_opt.safetensors", self.folder / "last_opt.pt"]:
            old.unlink(missing_ok=True)  # an older run's files, now in the checkpoint folder
        self._file.flush()

    def _write_meta(self) -> None:
        """``state.json`` through a synced temporary file and a rename."""
        meta_tmp = self.meta_path.with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps(self.meta))
        _fsync(meta_tmp)
        os.replace(meta_tmp, self.meta_path)
        _fsync(self.folder)

    def close(self) -> None:
        self._file.close()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float, warmup: bool = True) -> None:
    """ema <- ema + (1 - d) (model - ema), d = min(decay, (1 + step) / (10 + step)) with ``warmup``, else
    d = decay. A fine-tune (``--init``) turns the warm-up off: it would hand the EMA to the first, most
    disturbed steps and throw the trained starting point away."""
    d = min(decay, (1 + step) / (10 + step)) if warmup else decay
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` onto ``out`` (an old ``out`` is moved aside, then deleted), its files
    given the permissions the umask allows (``save_pretrained`` writes its weights 0600)."""
    ordinary_mode(tmp)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def plot_log(log_csv: Path, png: Path, loss_label: str, title: str, curves: list[tuple[str, str]],
             right_label: str, right_title: str) -> None:
    """Loss (raw and smoothed, log scale) on the left; the validation ``curves`` (column, label) right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({r["step"]: r for r in csv.DictReader(log_csv.open())}.values(), key=lambda r: int(r["step"]))
    steps = [int(r["step"]) for r in rows]
    loss = np.array([float(r["loss"]) for r in rows])
    k = 50
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid") if len(loss) > k else loss
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, loss, alpha=0.25, lw=0.5)
    ax[0].plot(steps[len(steps) - len(smooth):], smooth)
    ax[0].set(xlabel="step", ylabel=loss_label, yscale="log", title=title)
    for column, label in curves:
        val = [r for r in rows if r.get(column)]
        if val:
            ax[1].plot([int(r["step"]) for r in val], [float(r[column]) for r in val], "o-", label=label)
    if len(curves) > 1:
        ax[1].legend()
    ax[1].set(xlabel="step", ylabel=right_label, title=right_title)
    fig.tight_layout()
    fig.savefig(png.with_suffix(".tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(png.with_suffix(".tmp.png"), png)
