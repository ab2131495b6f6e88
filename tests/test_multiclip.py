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


def test_clip_names_with_hash_colon_or_dollar_get_their_own_outputs(clips, tmp_path):
    """A clip's name went into a config override unquoted: "take #1" and "take #2" both became "take" (the
    second's PNG frames replaced the first's), "Scene: 1" and "x${y}" failed as config errors."""
    folder = tmp_path / "odd"
    folder.mkdir()
    for i, name in enumerate(("take #1", "take #2", "Scene: 1", "x${y}")):
        write_video(folder / f"{name}.mp4", to_uint8(tiny.textured_clip(2, 16, seed=i)), 10)
    extra = [f"output.frames_dir={tmp_path / 'frames'}", f"output.side_by_side={tmp_path / 'cmp.mp4'}"]
    assert main([*args(clips, folder, tmp_path / "out"), *extra]) == 0
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["Scene: 1", "take #1", "take #2", "x_{y}"]
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 4 and len(list(tmp_path.glob("cmp_*.mp4"))) == 4


def test_a_rerun_with_the_workdir_skips_finished_clips(clips, tmp_path, capsys):
    """Rerunning the same many-clips command with --workdir (after a kill mid-list) refused every clip that had
    finished ("exists, use --overwrite"), exit 2: they are skipped now, and the list ends with 0."""
    cmd = [*args(clips, clips / "list.txt", tmp_path / "out"), "--workdir", str(tmp_path / "work")]
    assert main(cmd) == 0
    capsys.readouterr()
    assert main(cmd) == 0
    out, err = capsys.readouterr()
    assert out.count("done by an earlier run with this --workdir") == 2 and "error" not in err
    (tmp_path / "out" / "c0.mp4").write_bytes(b"replaced by someone")  # no longer what the run committed
    assert main(cmd) == 2 and "c0.mp4 exists" in capsys.readouterr().err


def test_list_mistakes_and_output_folders(clips, tmp_path, capsys):
    """A list saved with a byte-order mark, not as UTF-8, with '~' or a clip twice; an output folder named with
    a dot (was refused), the input folder as output (wrote into it), one error for all clips (was one per clip)
    and the exit code of a list with an internal error (was hidden behind 2) and a last line naming failures."""
    (tmp_path / "bom.txt").write_text("\ufeff" + str(clips / "clips" / "c0.mp4") + "\n" + str(clips / "clips" / "c0.mp4"),
                                      encoding="utf-8")
    assert [p.name for p in clip_list(tmp_path / "bom.txt")] == ["c0.mp4"]  # the mark dropped, the repeat too
    (tmp_path / "latin.txt").write_bytes(b"clips/\xe9 b.mp4\n")
    assert main(args(clips, tmp_path / "latin.txt", tmp_path / "o1")) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(args(clips, tmp_path / "bom.txt", tmp_path / "res.v2")) == 0
    capsys.readouterr()
    assert main(args(clips, clips / "clips", clips / "clips")) == 2
    assert "folder of input clips" in capsys.readouterr().err and not list((clips / "clips").glob("*.json"))
    assert main([*args(clips, clips / "clips", tmp_path / "o2"), "model.path=weights/nope"]) == 2
    assert capsys.readouterr().err.count("error:") == 1
    (tmp_path / "mixed.txt").write_text(f"{clips / 'clips' / 'c0.mp4'}\n{tmp_path / 'missing.mp4'}\n")
    assert main(args(clips, tmp_path / "mixed.txt", tmp_path / "o3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: 1 of 2 clips failed: missing.mp4 (exit 2)"


def test_an_internal_error_in_a_list_is_its_exit_code(clips, tmp_path, monkeypatch, capsys):
    """A list with a bad clip (2) and an internal error (1) ended with 2, "bad input, nothing written"."""
    import run_video

    real = run_video.run_clip

    def broken_for_c2(cfg, inp, *a, **k):
        if Path(inp).name == "c2.mp4":
            raise RuntimeError("boom")
        return real(cfg, inp, *a, **k)

    monkeypatch.setattr(run_video, "run_clip", broken_for_c2)
    (tmp_path / "l.txt").write_text(f"{tmp_path / 'missing.mp4'}\n{clips / 'clips' / 'c2.mp4'}\n")
    assert main(args(clips, tmp_path / "l.txt", tmp_path / "o")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: 2 of 2 clips failed: missing.mp4 (exit 2), c2.mp4 (exit 1)"


def test_each_process_gets_a_device_of_the_machines_accelerator_type(clips, monkeypatch):
    """Under the launcher each process takes one accelerator, named by its type: an XPU machine's processes
    were given model.device=xpu:N, which the config refused (only cuda:N passed) for every clip; a process that
    sees one device (a scheduler hides the others) was given an index beyond it."""
    import torch

    from pipelines.config import load_config
    from pipelines.many import plan_clips

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("xpu"))
    for count, want in ((2, "xpu:1"), (1, "xpu:0")):
        monkeypatch.setattr(torch.accelerator, "device_count", lambda: count)
        jobs = plan_clips([clips / "clips" / "c0.mp4", clips / "clips" / "c1.mp4"], given=clips / "clips",
                          output=clips / f"out_xpu{count}", config=ROOT / "configs" / "default.yaml",
                          overrides=[f"model.path={clips / 'model'}"], rank=1, world=2, local=1)
        assert len(jobs) == 1 and jobs[0].overrides[-1] == f"model.device={want}"
        assert load_config(ROOT / "configs" / "default.yaml", jobs[0].overrides).model.device == want
    # a device the user chose stays theirs (it was replaced by the accelerator's)
    jobs = plan_clips([clips / "clips" / "c0.mp4", clips / "clips" / "c1.mp4"], given=clips / "clips",
                      output=clips / "out_cpu", config=ROOT / "configs" / "default.yaml",
                      overrides=[f"model.path={clips / 'model'}", "model.device=cpu"], rank=1, world=2, local=1)
    assert load_config(ROOT / "configs" / "default.yaml", jobs[0].overrides).model.device == "cpu"
