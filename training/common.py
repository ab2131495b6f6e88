"""What the latent model's training scripts share: device choice, a resumable run folder (weights and
AdamW state as safetensors, ``state.json``, ``log.csv``), EMA, atomic folder export and the plots."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def parser(doc: str, run: Path, steps: int, batch: int, crop: int, lr: float):
    """The options every training script takes (its own are added by the caller)."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=run, help="checkpoint folder (resumed when it holds a run)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--crop", type=int, default=crop, help="ground-truth crop side in pixels")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--every", type=int, default=250, help="validate, checkpoint and export every N steps")
    p.add_argument("--device", default="auto")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="stop (validating, saving and exporting) after this many minutes of this session (0: no limit)")
    p.add_argument("--workers", type=int, default=0, help="threads preparing batches ahead (0: inline)")
    return p


def pick_device(name: str) -> torch.device:
    """``auto``: the accelerator when one is present (CUDA, ...), else the CPU; otherwise ``name`` itself."""
    if name != "auto":
        return torch.device(name)
    return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")


def setup(args) -> torch.device:
    """Threads, seed, the run folder; returns the device (the accelerator when present and ``--device auto``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.run.mkdir(parents=True, exist_ok=True)
    return pick_device(args.device)


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


class Run:
    """A resumable run in ``folder``: ``models`` (name -> module, saved as ``last_<name>.safetensors``),
    the optimizer, ``state.json`` (step, seconds) and ``log.csv`` with ``columns``."""

    def __init__(self, folder: Path, models: dict, opt: torch.optim.Optimizer, columns: list[str]):
        self.folder, self.models, self.opt = Path(folder), models, opt
        self.meta_path, self.log_csv = self.folder / "state.json", self.folder / "log.csv"
        self.step, self.meta = 0, {}
        if self.meta_path.exists():
            self.meta = json.loads(self.meta_path.read_text())
            self.step = self.meta["step"]
            for name, m in models.items():
                m.load_state_dict(load_file(self.folder / f"last_{name}.safetensors"))
            load_optimizer(opt, self.folder)
            print(f"resumed from step {self.step}", flush=True)
        self.session_start = self.step
        if self.meta and self.log_csv.exists():
            self._drop_rows_after(self.step)
        new_log = not self.log_csv.exists()
        self._file = self.log_csv.open("a", newline="")
        self.writer = csv.writer(self._file)
        if new_log:
            self.writer.writerow(columns)
        self.t_session = time.time()
        self.t_start = self.t_session - self.meta.get("seconds", 0.0)

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
        return self.step >= steps or timed_out

    def progress(self, steps: int, minutes: float) -> float:
        """How far through the run, in [0, 1]: by steps, or by this session's time when that ends it first."""
        by_time = (time.time() - self.t_session) / (60 * minutes) if minutes > 0 else 0.0
        return min(1.0, max(self.step / steps, by_time))

    def seconds(self) -> float:
        return time.time() - self.t_start

    def cosine(self, steps: int, minutes: float) -> float:
        """Learning-rate factor 0.5 + 0.5 cos(pi p), p = :meth:`progress`: 1 at the start, 0 at the end."""
        return 0.5 + 0.5 * math.cos(math.pi * self.progress(steps, minutes))

    def save(self) -> None:
        """Weights, optimizer and state after ``self.step`` steps; flushes the log."""
        for name, m in self.models.items():
            save_file(m.state_dict(), self.folder / f"last_{name}.safetensors")
        save_optimizer(self.opt, self.folder / "last_opt.safetensors")
        (self.folder / "last_opt.pt").unlink(missing_ok=True)
        self.meta.update(step=self.step, seconds=self.seconds())
        self.meta_path.write_text(json.dumps(self.meta))
        self._file.flush()

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
    """Move the finished folder ``tmp`` onto ``out`` (an old ``out`` is moved aside, then deleted)."""
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
