#!/usr/bin/env python
"""Sample a video with a diffusion model, frame-wise and bidirectionally, and report on the result.

    python run_video.py --config configs/<name>.yaml --input IN --output OUT.mp4 [--reference GT]
                        [--overwrite] [--workdir DIR] [--debug] [key=value ...]

``key=value`` entries override the config (OmegaConf dotlist). Beside OUT.mp4 go OUT.yaml (the merged
config) and OUT.json (the report). The work is ``pipelines.job.run_clip``; this file parses arguments,
maps errors to exit codes and shares many clips between processes.

Exit codes: 0 success; 2 bad input or config (one line on stderr, nothing written); 1 internal
error (one line; ``--debug`` re-raises with the traceback); 130 Ctrl-C; 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from pathlib import Path

from pipelines import interrupts  # torch-free: watches Ctrl-C before the imports below

interrupts.watch()

try:  # Ctrl-C while the libraries load: one line and exit 130, not a traceback. None of these imports torch
    # (see run_clip): --help, a bad command line and a config error return in a fraction of a second
    from pipelines.config import DEFAULT_CONFIG, ConfigError, asked_keys, from_root, load_config, to_yaml
    from pipelines.errors import InputError, OutputAppeared, UsageError, WorkdirMismatch, WriteError
    from pipelines.many import clip_list, end_process_group, list_exit_code, plan_clips, process_group
except BaseException as e:
    if interrupts.TERMINATED:  # an import that failed because of it
        print("error: terminated", file=sys.stderr, flush=True)
        sys.exit(143)
    if not (isinstance(e, KeyboardInterrupt) or interrupts.interrupted()):
        raise
    print("error: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
interrupts.arm()
if interrupts.TERMINATED:  # SIGTERM while the libraries loaded
    print("error: terminated", file=sys.stderr, flush=True)
    sys.exit(143)
interrupts.release_sigterm()  # a program that only imports this module keeps SIGTERM's usual meaning


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so every writer removes its temporary file; exit code 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run_clip(*args, **kwargs) -> dict:
    """:func:`pipelines.job.run_clip`, imported when a job is about to run (torch: seconds)."""
    return interrupts.import_held("pipelines.job").run_clip(*args, **kwargs)


def log(message: str, end: str = "\n") -> None:
    print(message, end=end, flush=True)  # progress lines on stdout; stderr holds the progress bar and errors


def fail(message: str) -> None:
    """One line on stderr, however many lines the message has, with one ``error:`` prefix."""
    text = " ".join(str(message).split())
    text = re.sub(r"^(?:(internal|config): )?(?:error: )+", lambda m: f"{m.group(1)}: " if m.group(1) else "", text)
    print("error: " + text, file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="run_video.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="job config (default: configs/default.yaml; relative paths fall back to the repo root)")
    p.add_argument("--input", default=None,
                   help="video, GIF, image or folder of images, or a folder of videos or .txt list of clips "
                        "(default: assets/example.mp4)")
    p.add_argument("--output", default=None,
                   help="output video (default: outputs/<input stem>_<config stem>.mp4); a folder for many clips")
    p.add_argument("--reference", default=None, help="ground-truth clip: PSNR, SSIM, warp error in the report")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--debug", action="store_true", help="re-raise internal errors with the traceback")
    p.add_argument("--workdir", default=None, help="checkpoint folder: a killed run restarted resumes from it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sampling.strength=0.6")
    args = p.parse_intermixed_args(argv)
    for flag in ("config", "input", "output", "reference", "workdir"):
        value = getattr(args, flag)
        if value is not None and not value.strip():  # an unset shell variable must not mean "the default"
            raise UsageError(f"--{flag} is empty; give a path or leave the option out")
    return args


def run(args: argparse.Namespace) -> int:
    config = from_root(Path(args.config))
    cfg = load_config(config, args.overrides)
    log(to_yaml(cfg), end="")
    run_clip(cfg, args.input, args.output, config_path=config, reference=args.reference, overwrite=args.overwrite,
             workdir=args.workdir, log=log, asked=asked_keys(config, args.overrides))
    return 0


def guarded(job, args) -> int:
    """Run ``job(args)`` and turn errors into the exit-code contract (one line on stderr)."""
    try:
        return job(args)
    except ConfigError as e:
        fail(f"config: {e}")
    except (InputError, UsageError, WorkdirMismatch, OutputAppeared) as e:
        fail(e)
    except WriteError as e:  # the machine's trouble (a full disk), not the input's: exit 1, no "internal"
        fail(e)
        return 1
    except KeyboardInterrupt:
        fail("interrupted")
        return 130
    except Terminated:
        fail("terminated")
        return 143
    except Exception as e:
        if interrupts.interrupted():  # the interrupt, wrapped by a library on its way up
            fail("interrupted")
            return 130
        if args.debug:
            raise
        name = type(e).__name__
        if name == "error":  # OpenCV's (and a few other libraries') exception class
            name = f"{type(e).__module__.split('.')[0]}.{name}"
        fail(f"internal: {name}: {e}")
        return 1
    return 2


# ----------------------------------------------------------------------------- many clips


def run_many(args: argparse.Namespace, clips: list[Path]) -> int:
    """Each process samples its share of the clips (pipelines.many) into the --output folder; returns the most
    telling exit code and names the clips that failed in a last line."""
    interrupts.import_held("pipelines.job")  # torch: plan_clips needs it, and so may process_group
    rank, world, local = process_group()
    jobs = plan_clips(clips, given=Path(args.input).expanduser() if args.input else None, output=args.output,
                      config=from_root(Path(args.config)), overrides=args.overrides, reference=args.reference,
                      workdir=args.workdir, overwrite=args.overwrite, rank=rank, world=world, local=local)
    log(f"[process {rank}/{world}] {len(jobs)} of {len(clips)} clips")
    codes, failed = [], []
    for job in jobs:
        if job.done:
            log(f"[process {rank}/{world}] {job.clip}: done by an earlier run with this --workdir ({job.output})")
            continue
        log(f"[process {rank}/{world}] {job.clip} -> {job.output}")
        one = argparse.Namespace(**{**vars(args), "input": str(job.clip), "output": str(job.output),
                                    "workdir": job.workdir and str(job.workdir), "overrides": job.overrides})
        codes.append(guarded(run, one))
        if codes[-1] not in (0, 130, 143):  # a stop is said by its own line
            failed.append(f"{job.clip.name} (exit {codes[-1]})")
        if codes[-1] in (130, 143):  # Ctrl-C or SIGTERM stops the whole list, not just this clip
            break
    if failed:
        fail(f"{len(failed)} of {len(jobs)} clips failed: {', '.join(failed)}")
    end_process_group(world)
    return list_exit_code(codes)


def main(argv: list[str] | None = None) -> int:
    if interrupts.interrupted():  # a Ctrl-C while the libraries loaded that some import swallowed
        fail("interrupted")
        return 130
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    if interrupts.TERMINATED:  # while the libraries loaded
        fail("terminated")
        return 143
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        return fail(e) or 2
    try:
        clips = clip_list(Path(args.input).expanduser()) if args.input else None
    except UsageError as e:
        return fail(e) or 2
    if clips is not None:
        return guarded(lambda a: run_many(a, clips), args)
    return guarded(run, args)


if __name__ == "__main__":
    interrupts.forgive_closed_readers()
    sys.exit(main())
