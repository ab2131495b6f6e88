"""The job config: schema defaults, YAML + overrides, one-line errors, translation to library objects."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.align import Alignment, Fusion
from pipelines.config import (ConfigError, build_alignment, flow_config, load_config, sampling_options, to_yaml)
from pipelines.flow import FlowConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_schema_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.model.path == "weights/latent-x4" and cfg.scheduler.kind == "auto"
    assert cfg.alignment.mode == "none" and cfg.schedule.chain_length == 0


def test_project_configs_load():
    cfg = load_config(DEFAULT)
    assert (cfg.sampling.num_inference_steps, cfg.sampling.strength, cfg.alignment.mode) == (10, 1.0, "fusion")
    assert (cfg.alignment.weight, cfg.alignment.space, cfg.schedule.chain_length) == (0.3, "frame", 0)
    indep = load_config(ROOT / "configs" / "independent.yaml")
    assert indep.alignment.mode == "none"
    assert indep.sampling == cfg.sampling and indep.flow == cfg.flow  # everything else from default.yaml


def test_overrides_win_and_yaml_round_trips(tmp_path):
    cfg = load_config(DEFAULT, ["sampling.strength=0.6", "sampling.num_inference_steps=12", "input.end=8",
                                "sampling.prompt=a wolf"])
    assert (cfg.sampling.strength, cfg.sampling.num_inference_steps, cfg.input.end) == (0.6, 12, 8)
    assert load_config(write(tmp_path, to_yaml(cfg))) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["sampling.strength=1.5"], "sampling.strength must be in (0, 1], got 1.5"),
    (["sampling.strength=0"], "sampling.strength must be in (0, 1], got 0.0"),
    (["sampling.num_inference_steps=0"], "sampling.num_inference_steps must be >= 1, got 0"),
    (["sampling.num_inference_steps=3", "sampling.strength=0.2"], "leaves no denoising step"),
    (["sampling.num_inference_steps=abc"], "sampling.num_inference_steps: Value 'abc'"),
    (["sampling.foo=1"], "unknown key sampling.foo (in override 'sampling.foo=1')"),
    (["bogus=1"], "unknown key bogus"),
    (["alignment.mode=magic"], "alignment.mode: Invalid value 'magic'"),
    (["alignment.weight=2"], "alignment.weight must be in [0, 1], got 2.0"),
    (["scheduler.eta=1.5"], "scheduler.eta must be in [0, 1], got 1.5"),  # ran: DDIM's step NaN, a black video
    (["schedule.chain_length=-1"], "schedule.chain_length must be >= 0"),
    (["flow.scale=0"], "flow.scale must be in (0, 1]"),
    (["flow.method=raft"], "flow.raft_weights must be a local RAFT weights file"),
    (["model.device=gpu"], "model.device must be auto, cpu or an accelerator such as cuda, cuda:N, xpu:N or mps, "
                           "got 'gpu'"),
    (["input.end=0"], "input.end must be null or > input.start"),
    # torch wraps an index into 8 bits (cuda:256 ran on cuda:0) and refuses cuda:01 as 'not a device type'
    (["model.device=cuda:256"], "model.device must be an accelerator with an index N in [0, 127] without leading zeros"),
    (["model.device=cuda:01"], "model.device must be an accelerator with an index N in [0, 127]"),
    (["input.resize=-1"], "input.resize must be null or in (0, 16]"),
    (["sampling.strength"], "override 'sampling.strength' is not key=value"),
    # the value is parsed as YAML: a stray quote or bracket was a yaml ScannerError / ParserError (exit 1)
    (["sampling.prompt='x"], "the value is not valid YAML (while scanning a quoted scalar"),
    (["sampling.prompt=[1, 2"], "the value is not valid YAML (while parsing a flow sequence"),
    # OmegaConf's "unset" mark: the merge kept the default and the run went on without a word
    (["sampling.strength=???"], "sampling.strength: '???' marks a value as unset"),
    (["sampling.prompt=???"], "sampling.prompt: '???' marks a value as unset"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("sampling:\n  steps: [1\n", "invalid YAML at line"),
    ("sampling:\n  stepz: 3\n", "unknown key sampling.stepz"),
    ("sampling:\n  num_inference_steps: many\n", "sampling.num_inference_steps: Value 'many'"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("42\n", "expected a mapping of sections at the top level, got a single value"),  # was an AssertionError
    ("true\n", "expected a mapping of sections at the top level, got a single value"),
    ("sampling:\n  strength: ???\n", "sampling.strength: '???' marks a value as unset"),  # ran at strength 1
    ("base: job.yaml\n", "loops back"),
    ("base: missing.yaml\n", "missing.yaml: no such file"),
])
def test_bad_files_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_boolean_key_takes_only_a_boolean(tmp_path):
    """OmegaConf turns any integer into a boolean, so back_projection=2 (or -1) ran as true without a word: refused
    now, in overrides, in a file and in its base; the spellings OmegaConf documents as booleans still work."""
    for over in (["sampling.back_projection=2"], ["alignment.tcm_masked=2"], ["sampling={back_projection: -1}"],
                 ['output.audio="2"']):
        with pytest.raises(ConfigError, match=r"must be true or false, got \S+ \(in override") as err:
            load_config(DEFAULT, over)
        assert "\n" not in str(err.value)
    base = write(tmp_path, "sampling:\n  back_projection: 2\n", "base.yaml")
    for path in (base, write(tmp_path, "base: base.yaml\n")):
        with pytest.raises(ConfigError, match=r"sampling.back_projection must be true or false, got 2 \(in .*base"):
            load_config(path)
    for value, meant in (("true", True), ("False", False), ("yes", True), ("off", False), ("1", True), ("0", False)):
        assert load_config(None, [f"sampling.back_projection={value}"]).sampling.back_projection is meant


def test_a_boolean_given_as_an_interpolation_is_held_to_the_same_rule(tmp_path):
    """back_projection: ${runtime.threads} with threads at 2 ran as true without a word (OmegaConf turns what an
    interpolation resolves to into a boolean like any value): its resolved value is checked now, in a file and
    in an override; one that resolves to a boolean spelling still works, a missing target is one line."""
    path = write(tmp_path, "runtime:\n  threads: 2\nsampling:\n  back_projection: ${runtime.threads}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == ("sampling.back_projection must be true or false, got 2 from ${runtime.threads} "
                              f"(in {path})")
    for over in (["sampling.seed=5", "sampling.back_projection=${.seed}"],
                 ["alignment.tcm_masked=${sampling.noise_level}"], ["output.audio=${oc.env:NO_SUCH_VARIABLE,2}"]):
        with pytest.raises(ConfigError, match=r"must be true or false, got \S+ from \$\{"):
            load_config(None, over)
    for over, meant in ((["runtime.threads=1", "sampling.back_projection=${runtime.threads}"], True),
                        (["runtime.threads=0", "sampling.back_projection=${runtime.threads}"], False),
                        (["alignment.tcm_masked=true", "sampling.back_projection=${alignment.tcm_masked}"], True),
                        (["sampling.back_projection=${oc.env:NO_SUCH_VARIABLE,yes}"], True)):
        assert load_config(None, over).sampling.back_projection is meant
    for over, message in ((["sampling.back_projection=${nope.x}"], "Interpolation key 'nope.x' not found"),
                          (["sampling.back_projection=${model.path}"], "is not a valid bool")):
        with pytest.raises(ConfigError, match=rf"^sampling.back_projection: .*{message}.*\(in override '.*'\)$"):
            load_config(None, over)


def test_an_interpolation_error_names_the_file_or_override_that_set_the_key(tmp_path):
    """An interpolation that failed to resolve, or resolved to no boolean for a bool key, said "(in config)":
    it names the override, or the file of the base: chain, that set the key now (the last one, as merged)."""
    base = write(tmp_path, "sampling:\n  back_projection: ${nope.x}\n  seed: ${nope.y}\n", "base.yaml")
    job = write(tmp_path, "base: base.yaml\nsampling:\n  seed: 3\nruntime:\n  threads: 2\n")
    messages = {
        (): f"sampling.back_projection: Interpolation key 'nope.x' not found (in {base})",
        ("sampling.back_projection=${runtime.threads}",):
            "sampling.back_projection must be true or false, got 2 from ${runtime.threads} "
            "(in override 'sampling.back_projection=${runtime.threads}')",
        ("sampling.back_projection=${runtime.threads}", "sampling.back_projection=${nope.z}"):
            "sampling.back_projection: Interpolation key 'nope.z' not found "
            "(in override 'sampling.back_projection=${nope.z}')",
        ("sampling.back_projection=true", "sampling.noise_level=${nope.w}"):
            "sampling.noise_level: Interpolation key 'nope.w' not found (in override 'sampling.noise_level=${nope.w}')",
    }
    for overrides, message in messages.items():
        with pytest.raises(ConfigError) as err:
            load_config(job, list(overrides))
        assert str(err.value) == message
    # the file that set the key last: job.yaml's own value over base.yaml's
    write(tmp_path, "base: base.yaml\nsampling:\n  back_projection: ${runtime.threads}\nruntime:\n  threads: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(job, ["sampling.seed=1"])
    assert str(err.value) == ("sampling.back_projection must be true or false, got 2 from ${runtime.threads} "
                              f"(in {job})")


def test_an_empty_override_says_so_and_how_to_give_an_empty_string():
    """sampling.prompt= said "Incompatible value 'None' for field of type 'str'": the value is empty, and an
    empty string is written "" or ''."""
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, ["sampling.prompt="])
    assert str(err.value) == ("sampling.prompt: the value is empty, which OmegaConf reads as null; for an empty string "
                              "give sampling.prompt=\"\" or sampling.prompt='', quoted for the shell as in "
                              "'sampling.prompt=\"\"' (in override 'sampling.prompt=')")
    with pytest.raises(ConfigError, match=r"^sampling.seed: the value is empty, .*; give a value \(in override"):
        load_config(DEFAULT, ["sampling.seed="])
    assert load_config(DEFAULT, ['sampling.prompt=""']).sampling.prompt == ""
    assert load_config(DEFAULT, ["input.end="]).input.end is None  # null where the key allows it


def test_a_null_override_says_so():
    """sampling.prompt=null (or ~, or 'sampling={prompt: }') said "Incompatible value 'None'", sampling=null
    "field 'sampling' is not Optional", unlike an empty override: now the key, that it takes no null, and how to
    give an empty string; null stays a value of the Optional keys."""
    for item in ("sampling.prompt=null", "sampling.prompt=~", "sampling={prompt: }"):
        with pytest.raises(ConfigError) as err:
            load_config(DEFAULT, [item])
        assert str(err.value) == ("sampling.prompt: the value is null (or empty in YAML), which this key does not "
                                  "take; for an empty string give sampling.prompt=\"\" or sampling.prompt='', quoted "
                                  f"for the shell as in 'sampling.prompt=\"\"' (in override {item!r})")
    for item, message in (("sampling.num_inference_steps=null", "sampling.num_inference_steps: .*; give a value"),
                          ("sampling.back_projection=null", "sampling.back_projection: .*; give a value"),
                          ("sampling=null", r"sampling: .*; give its keys \(sampling.name=value\)")):
        with pytest.raises(ConfigError, match=rf"^{message} \(in override '{item}'\)$"):
            load_config(DEFAULT, [item])
    cfg = load_config(DEFAULT, ["input.end=null", "output.fps=~", "sampling={prompt: x, negative_prompt: y}"])
    assert (cfg.input.end, cfg.output.fps, cfg.sampling.prompt) == (None, None, "x")

def test_an_empty_value_in_a_file_says_so(tmp_path):
    """prompt: (nothing) in a YAML file said "Incompatible value 'None' for field of type 'str'", as the override
    did: now the key, that the value is empty, and the file; null stays a value of an Optional key."""
    for text, message in [
            ("sampling:\n  prompt:\n", "sampling.prompt: the value is empty (null in YAML), which this key does not "
                                       "take; for an empty string write prompt: \"\""),
            ("scheduler:\n  kind:\n", "scheduler.kind: the value is empty (null in YAML), which this key does not "
                                      "take; give a value"),
            ("sampling:\n  back_projection: null\n", "sampling.back_projection: the value is empty (null in YAML), "
                                                      "which this key does not take; give a value"),
            ("sampling:\n", "sampling: the section is empty (null in YAML); give its keys under it, or leave it out"),
            ("base:\n", "base: the value is empty (null in YAML); give a file name, or leave it out")]:
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert str(err.value) == f"{message} (in {path})"
    base = write(tmp_path, "runtime:\n  threads:\n", "base.yaml")
    with pytest.raises(ConfigError, match=r"^runtime.threads: the value is empty .* \(in .*base.yaml\)$"):
        load_config(write(tmp_path, "base: base.yaml\n"))
    cfg = load_config(write(tmp_path, "input:\n  end:\noutput:\n  fps: null\nsampling:\n  prompt: \"\"\n"))
    assert (cfg.input.end, cfg.output.fps, cfg.sampling.prompt) == (None, None, "")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_translation_to_library_objects():
    cfg = load_config(DEFAULT, ["scheduler.eta=0.3", "schedule.chain_length=4", "schedule.passes=2"])
    o = sampling_options(cfg)
    assert (o.eta, o.chain_length, o.passes, o.strength) == (0.3, 4, 2, 1.0)
    assert sampling_options(load_config(DEFAULT)).chain_length is None  # 0 -> exact sweep
    assert flow_config(cfg) == FlowConfig(method="dis", dis_preset="medium")
    every = load_config(DEFAULT, ["flow.method=farneback", "flow.dis_preset=fast", "flow.scale=0.5",
                                  "flow.fb_alpha1=0.02", "flow.fb_alpha2=0.7"])
    assert flow_config(every) == FlowConfig(method="farneback", dis_preset="fast", raft_weights=None, scale=0.5,
                                            fb_alpha1=0.02, fb_alpha2=0.7)


def test_build_alignment():
    pipe = SimpleNamespace(controlnet=None, scheduler=SimpleNamespace(config=SimpleNamespace(num_train_timesteps=500)))
    assert type(build_alignment(load_config(None), pipe)) is Alignment
    fusion = build_alignment(load_config(None, ["alignment.mode=fusion", "alignment.weight=0.3",
                                                "alignment.weight_schedule=linear"]), pipe)
    assert isinstance(fusion, Fusion) and (fusion.weight, fusion.schedule, fusion.T) == (0.3, "linear", 500)
    with pytest.raises(ConfigError, match="alignment.mode=tcm needs a model with a controlnet/ folder"):
        build_alignment(load_config(None, ["alignment.mode=tcm"]), pipe)


def test_build_alignment_tcm():
    from pipelines.tcm import TCMAlignment

    sched = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    pipe = SimpleNamespace(controlnet=object(), vae=object(), scheduler=sched)
    tcm = build_alignment(load_config(None, ["alignment.mode=tcm", "alignment.tcm_scale=0.7",
                                             "alignment.tcm_masked=true", "alignment.tcm_fusion=true"]), pipe)
    assert isinstance(tcm, TCMAlignment) and (tcm.scale, tcm.masked) == (0.7, True)
    assert isinstance(tcm.fusion, Fusion) and tcm.fusion.weight == 0.5
    with pytest.raises(ConfigError, match="no VAE"):
        build_alignment(load_config(None, ["alignment.mode=tcm"]), SimpleNamespace(**{**vars(pipe), "vae": None}))


def test_tcm_fusion_fuses_in_the_space_asked_for():
    """alignment.space=decoded with tcm_fusion ran latent fusion without a word."""
    from pipelines.align import DecodedFusion

    sched = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    pipe = SimpleNamespace(controlnet=object(), vae=object(), scheduler=sched)
    both = ["alignment.mode=tcm", "alignment.tcm_fusion=true"]
    assert isinstance(build_alignment(load_config(None, [*both, "alignment.space=decoded"]), pipe).fusion,
                      DecodedFusion)
    assert type(build_alignment(load_config(None, both), pipe).fusion) is Fusion


def test_asked_keys_are_the_users_not_the_shipped_configs(tmp_path):
    """Keys a user typed (overrides, their own YAML) count; a shipped config's keys, which a user's file may
    take as its base, do not: their values were chosen for the shipped mode."""
    from pipelines.config import asked_keys

    own = write(tmp_path, f"base: {DEFAULT}\nalignment:\n  weight: 0.7\nflow: {{scale: 0.5}}\n")
    assert asked_keys(own, ["scheduler.eta=1", "schedule={passes: 2}"]) == {
        "alignment.weight", "flow.scale", "scheduler.eta", "schedule.passes"}
    assert asked_keys(DEFAULT, ["alignment.mode=none"]) == {"alignment.mode"}


def test_settings_without_effect_are_named():
    """A dozen keys were accepted and did nothing (found by running each with and without): each is named
    with its reason when the user set it, and not when a shipped config did."""
    import diffusers

    from pipelines.config import ineffective_settings

    pipe = SimpleNamespace(kind="residual_sr", vae=None, text_encoder=None, scheduler=diffusers.DDPMScheduler(),
                           upscale_convention=lambda: "stablevsr")
    over = ["alignment.mode=none", "alignment.weight=0.7", "schedule.passes=2", "scheduler.eta=1",
            "sampling.noise_level=300", "flow.method=farneback", "flow.dis_preset=fast", "alignment.tcm_start=0.5",
            "model.vae_tiling=true", "flow.raft_weights=/x.pth"]
    cfg = load_config(DEFAULT, over)
    lines = ineffective_settings(cfg, pipe, {o.split("=")[0] for o in over})
    named = sorted(line.split("=")[0].removeprefix("config: ") for line in lines)
    assert named == sorted(o.split("=")[0] for o in over if o.split("=")[0] not in ("alignment.mode", "flow.method"))
    assert "DDPMScheduler takes none" in next(line for line in lines if "eta" in line)
    assert ineffective_settings(cfg, pipe, {"alignment.mode"}) == []  # default.yaml's weight 0.3: not the user's
    pipe.scheduler = diffusers.DDIMScheduler()
    assert not any("eta" in line for line in ineffective_settings(cfg, pipe, {"scheduler.eta"}))
