"""Many clips: a folder of videos or a ``.txt`` list, each clip a job of its own, shared between the processes
of torch.distributed's launcher. :func:`plan_clips` checks what all clips share once and names each clip's
outputs; the caller runs each :class:`ClipJob` (the command line: ``run_video.py`` with one clip's arguments).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import load_config
from .errors import UsageError

# torch and pipelines.job are imported where they are used: run_video.py imports this module before it knows
# whether the command line names a list (a single clip's --help and config errors need neither)

# the exit code of a list: the most telling of its clips' (a stop, then an internal error, then bad input)
SEVERITY = {143: 4, 130: 3, 1: 2, 2: 1, 0: 0}


@dataclass
class ClipJob:
    clip: Path
    output: Path
    workdir: Path | None
    overrides: list[str]  # the user's, then this clip's own output paths (and device)
    done: bool  # finished by an earlier run with this work folder: nothing to do


def _quoted(value) -> str:
    """A config override's value as a YAML single-quoted string: a clip's name may hold '#' or ': '."""
    return "'" + str(value).replace("'", "''") + "'"


def plan_clips(clips: list[Path], *, given: Path | None, output, config: Path, overrides: list[str],
               reference=None, workdir=None, overwrite: bool = False, rank: int = 0, world: int = 1,
               local: int = 0) -> list[ClipJob]:
    """This process's share of ``clips`` (every ``world``-th from ``rank``) as jobs writing into the folder
    ``output``; UsageError / ConfigError once for what every clip would hit (``given``: the --input)."""
    import torch

    from .job import OUTPUT_EXTS, _creatable_parent, resolve_model_path

    outdir = Path(output).expanduser() if output else Path("outputs")
    if (outdir.exists() and not outdir.is_dir()) or (not outdir.exists() and outdir.suffix.lower() in OUTPUT_EXTS):
        raise UsageError(f"--output must be a folder when --input is a list of clips, got {outdir}")
    if reference:
        raise UsageError("--reference takes one clip; it cannot be used with a list of clips")
    inputs = {c.resolve().parent for c in clips} | ({given.resolve()} if given and given.is_dir() else set())
    if outdir.resolve() in inputs:  # its outputs would be taken for clips by the next run
        raise UsageError(f"--output {outdir} is a folder of input clips; write the outputs elsewhere")
    work = Path(workdir).expanduser() if workdir else None
    if work is not None and work.exists() and not work.is_dir():
        raise UsageError(f"--workdir {workdir} exists and is not a folder")
    cfg = load_config(config, overrides)  # a config error: one line, once
    resolve_model_path(cfg)  # once, not once per clip
    _creatable_parent("--output", outdir / "x.mp4")
    sbs = Path(cfg.output.side_by_side).expanduser() if cfg.output.side_by_side else None
    frames_dir = Path(cfg.output.frames_dir).expanduser() if cfg.output.frames_dir else None
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    names = output_names(clips)
    jobs = []
    for k in range(rank, len(clips), world):
        extra = []  # each clip's comparison video and frames of its own (one path for all: the second clip failed)
        if sbs is not None:
            extra.append(f"output.side_by_side={_quoted(sbs.with_name(f'{sbs.stem}_{names[k]}{sbs.suffix}'))}")
        if frames_dir is not None:
            extra.append(f"output.frames_dir={_quoted(frames_dir / names[k])}")
        if world > 1 and accelerator is not None and cfg.model.device == "auto":  # one accelerator per process (or per process the only one
            # it sees, as under a scheduler that hides the others; more processes than devices share them)
            extra.append(f"model.device={accelerator.type}:{local % max(1, torch.accelerator.device_count())}")
        clip_work = None if work is None else work / names[k]
        jobs.append(ClipJob(clips[k], outdir / f"{names[k]}.mp4", clip_work, [*overrides, *extra],
                            clip_work is not None and not overwrite and clip_done(clip_work)))
    return jobs


def list_exit_code(codes: list[int]) -> int:
    """The most telling exit code of a list's clips (SEVERITY)."""
    return max([0, *codes], key=lambda c: SEVERITY.get(c, 2))


def clip_list(inp: Path) -> list[Path] | None:
    """A ``.txt`` list of clips (relative to the list) or a folder of videos; None for a single clip."""
    if inp.suffix.lower() == ".txt" and inp.is_file():
        try:
            text = inp.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad's) is not part of a path
        except UnicodeDecodeError as e:
            raise UsageError(f"--input {inp} is not UTF-8 text (byte {e.start}); save the list as UTF-8") from None
        except OSError as e:
            raise UsageError(f"--input {inp}: cannot read ({e.strerror or e})") from None
        lines = [ln.strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if not lines:
            raise UsageError(f"--input {inp} lists no clips (one path per line; '#' starts a comment)")
        clips, seen = [], set()
        for p in (Path(ln).expanduser() for ln in lines):
            clip = p if p.is_absolute() else inp.parent / p
            if clip.resolve() in seen:  # the same clip twice would be sampled twice
                continue
            seen.add(clip.resolve())
            clips.append(clip)
        return clips
    if inp.is_dir():
        from .video_io import IMAGE_EXTS, VIDEO_EXTS  # imports torch: only for a folder, whose job needs it anyway

        clip_exts = (*VIDEO_EXTS, ".gif")
        files = [p for p in inp.iterdir() if p.is_file() and not p.name.startswith(".")]
        videos = sorted(p for p in files if p.suffix.lower() in clip_exts)
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
        if videos and images:  # frames of one clip, or many clips? either reading could lose the user's intent
            raise UsageError(f"--input {inp} holds {len(videos)} video(s) ({videos[0].name}...) and {len(images)} "
                             "image(s): a folder is either the frames of one clip or a set of clips; move one kind "
                             "out, or list the clips in a .txt")
        if videos:
            return videos
    return None


def clip_done(workdir: Path) -> bool:
    """Whether the run with this work folder finished, its outputs still the files it committed (many-clips
    mode skips such a clip when the same command runs again)."""
    from .job import recorded_outputs

    done, outputs = recorded_outputs(workdir)
    return done and all(outputs.values())


def output_names(clips: list[Path]) -> list[str]:
    """A distinct output stem per clip: its stem, or ``stem_ext`` (then ``_2``...) where stems collide ('$'
    becomes '_': the config would read "${...}" as an interpolation)."""
    stems = [c.stem.replace("$", "_") for c in clips]
    names, used = [], set()
    for clip, stem in zip(clips, stems):
        name = stem if stems.count(stem) == 1 else f"{stem}_{clip.suffix.lstrip('.').lower() or 'clip'}"
        base, n = name, 2
        while name in used:
            name, n = f"{base}_{n}", n + 1
        used.add(name)
        names.append(name)
    return names


def process_group():
    """(rank, world, local rank) under ``torchrun`` / ``accelerate launch``, else (0, 1, 0). The processes
    meet once, at the end, maybe hours apart: timeout RUN_VIDEO_BARRIER_HOURS (168), not gloo's 30 min."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        hours = float(os.environ.get("RUN_VIDEO_BARRIER_HOURS", "168"))
        dist.init_process_group("gloo", timeout=timedelta(hours=hours))  # CPU barriers only: any accelerator
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))



def end_process_group(world: int) -> None:
    """Meet the other processes once at the end, then leave the group (with more than one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
