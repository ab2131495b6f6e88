"""Many clips: a folder of clips or a list file, shared between torch.distributed processes."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from pipelines.video_io import to_uint8, write_video
from run_video import clip_list, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("many")
    tiny.save_residual_sr(tmp / "model", scale=2)
    (tmp / "clips").mkdir()
    for i in range(3):
        write_video(tmp / "clips" / f"c{i}.mp4", to_uint8(tiny.textured_clip(3, 16, seed=i)), 10)
    (tmp / "list.txt").write_text("clips/c2.mp4\n# a comment\nclips/c0.mp4\n")
    return tmp


def args(tmp, inp, out):
    return ["--input", str(inp), "--output", str(out), f"model.path={tmp / 'model'}",
            "sampling.num_inference_steps=2", "runtime.threads=1"]


def test_folder_of_clips_and_list_file(clips):
    assert [p.name for p in clip_list(clips / "clips")] == ["c0.mp4", "c1.mp4", "c2.mp4"]
    assert [p.name for p in clip_list(clips / "list.txt")] == ["c2.mp4", "c0.mp4"]
    assert clip_list(clips / "clips" / "c0.mp4") is None
    assert main(args(clips, clips / "list.txt", clips / "out_list")) == 0
    assert sorted(p.name for p in (clips / "out_list").glob("*.mp4")) == ["c0.mp4", "c2.mp4"]
    assert main(args(clips, clips / "clips", clips / "bad.mp4")) == 2  # --output must be a folder
    # one comparison video and one frames folder per clip, named after it
    extra = [f"output.side_by_side={clips / 'cmp' / 'sbs.mp4'}", f"output.frames_dir={clips / 'frames'}"]
    assert main([*args(clips, clips / "list.txt", clips / "out_sbs"), *extra]) == 0
    assert sorted(p.name for p in (clips / "cmp").glob("*.mp4")) == ["sbs_c0.mp4", "sbs_c2.mp4"]
    assert sorted(p.name for p in (clips / "frames").iterdir()) == ["c0", "c2"]
    assert len(list((clips / "frames" / "c2").glob("*.png"))) == 3


def test_clip_list_mistakes_are_one_line_errors(clips, capsys):
    (clips / "empty.txt").write_text("# nothing here\n   # an indented comment\n\n")
    assert main(args(clips, clips / "empty.txt", clips / "out_empty")) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --input {clips / 'empty.txt'} lists no clips (one path per line; '#' starts a comment)"]
    (clips / "indented.txt").write_text("  # an indented comment\nclips/c1.mp4\n")
    assert [p.name for p in clip_list(clips / "indented.txt")] == ["c1.mp4"]
    # a config mistake is reported once, not once per clip
    assert main([*args(clips, clips / "list.txt", clips / "out_bad"), "bogus.key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: config: unknown key bogus (in override 'bogus.key=1')"]


def test_two_cpu_workers_share_the_clips(clips):
    """torch.distributed's launcher in local mode, two CPU processes (gloo)."""
    out = clips / "out_dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "run_video.py"), *args(clips, clips / "clips", out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    done = re.findall(r"\[process (\d)/2\] \S+/(c\d)\.mp4 ->", res.stdout)
    assert sorted(c for _, c in done) == ["c0", "c1", "c2"]  # every clip once
    assert {r for r, _ in done} == {"0", "1"}  # by both workers
    assert sorted(p.name for p in out.glob("*.mp4")) == ["c0.mp4", "c1.mp4", "c2.mp4"]
