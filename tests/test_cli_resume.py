"""Resume after a real kill: SIGKILL the CLI mid-run, rerun the same command, get identical output."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import tiny
from pipelines.video_io import read_clip, to_uint8, write_video

ROOT = Path(__file__).resolve().parents[1]


def completed_steps(state: Path) -> int:
    try:
        with safe_open(state, framework="pt") as f:
            return int(f.metadata()["step"])
    except Exception:  # not written yet, or being replaced
        return -1


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    model = tiny.save_residual_sr(tmp / "model", scale=2)
    clip = tmp / "clip.mp4"
    write_video(clip, to_uint8(tiny.textured_clip(6, 48, shift=(1.0, 0.5))), 10)
    return tmp, model, clip


def command(tmp, model, clip, name, *extra):
    return [sys.executable, str(ROOT / "run_video.py"), "--input", str(clip), "--output", str(tmp / f"{name}.mp4"),
            f"model.path={model}", "sampling.num_inference_steps=30", "sampling.strength=1.0",
            "alignment.mode=fusion", "sampling.batch_size=1", "runtime.threads=1",
            f"output.frames_dir={tmp / (name + '_frames')}", *extra]


ENV = dict(os.environ, PYTHONUNBUFFERED="1")
EXTRA = {"memory": [], "files": ["runtime.files_above=0"],
         "windows": ["runtime.mode=windows", "runtime.window=4", "runtime.overlap=2"]}


@pytest.fixture(scope="module")
def straight(job):
    """``straight(mode)``: (folder, process) of the uninterrupted run, started in the background the first time
    a test asks for it, so that it runs beside that test's killed and resumed runs. The state in memory and in
    files share one: where the samples are kept does not change the output (test_job's bit-for-bit test of
    both against the library call), so a run resumed from files must give these frames too. (The clip, model
    and 30 steps stay: the H.264 comparison's 45 dB holds for this content, whose encodings differ by 48.9 dB
    at worst; 12 steps or an (8, 16) UNet give noisier frames whose encodings differ by 42-44 dB.)"""
    tmp, model, clip = job
    runs = {}

    def start(mode):
        kind = "windows" if mode == "windows" else "one_pass"
        if kind not in runs:
            folder = tmp / f"straight_{kind}"
            folder.mkdir()
            with open(folder / "stderr.txt", "wb") as err:
                runs[kind] = folder, subprocess.Popen(command(folder, model, clip, "straight", *EXTRA[
                    "windows" if kind == "windows" else "memory"]),
                                                      env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        return runs[kind]

    yield start
    for _, proc in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("mode", ["memory", "files", "windows"])
def test_killed_run_resumes_to_identical_output(job, straight, mode):
    """One pass with the state in memory, one pass with it in files (runtime.files_above=0), windows."""
    tmp, model, clip = job
    extra, env = EXTRA[mode], ENV
    ref, ref_proc = straight(mode)
    tmp = tmp / mode
    tmp.mkdir()

    work = tmp / "work"
    cmd = command(tmp, model, clip, "resumed", "--workdir", str(work), *extra)
    state = work / ("window0000" if mode == "windows" else "") / "state.safetensors"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while completed_steps(state) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = completed_steps(state)
    assert 3 <= killed_at < 30 and not (tmp / "resumed.mp4").exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert ref_proc.wait() == 0, (ref / "stderr.txt").read_text()
    a = sorted((ref / "straight_frames").glob("*.png"))
    b = sorted((tmp / "resumed_frames").glob("*.png"))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes()  # the output frames, bit for bit
    # The H.264 files hold those frames. Their encodings are not always bit-identical across processes: in
    # some test orderings one of the two runs' files came out different (48.9 dB between the decoded
    # videos, identical PNG frames, the same x264 settings), so the videos are compared by PSNR
    sa, sb = read_clip(ref / "straight.mp4").frames, read_clip(tmp / "resumed.mp4").frames
    assert sa.shape == sb.shape == (6, 96, 96, 3)
    mse = np.mean((sa.astype(float) - sb.astype(float)) ** 2)
    assert mse == 0 or 10 * np.log10(255 ** 2 / mse) > 45


def test_workdir_from_another_config_is_refused(job):
    tmp, model, clip = job
    work = tmp / "work2"
    first = command(tmp, model, clip, "w1", "--workdir", str(work), "sampling.num_inference_steps=2")
    assert subprocess.run(first, capture_output=True).returncode == 0
    other = command(tmp, model, clip, "w2", "--workdir", str(work), "sampling.num_inference_steps=2",
                    "sampling.seed=5")
    res = subprocess.run(other, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "different configuration" in res.stderr
