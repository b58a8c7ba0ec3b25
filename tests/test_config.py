"""Config loading: every shipped YAML loads; overrides are typed; every mistake is a ConfigError that says where."""
from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import yaml

from t2i_align.config import (Config, ConfigError, LoraConfig, ModelConfig, config_to_dict, load_config,
                              save_config)

REPO_ROOT = Path(__file__).resolve().parents[1]
# configs/accelerate/ holds `accelerate launch --config_file` files, checked in tests/test_accelerate_configs.py.
ALL_YAMLS = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml") if p.parent.name != "accelerate")


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _undocumented_fields(source: str) -> list:
    """Dataclass fields (annotated class attributes) not followed by a string: the attribute docstring."""
    missing = []
    for cls in (node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)):
        for field, after in zip(cls.body, cls.body[1:] + [None]):
            documented = isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant) \
                and isinstance(after.value.value, str)
            if isinstance(field, ast.AnnAssign) and not documented:
                missing.append(f"{cls.name}.{field.target.id}")
    return missing


def test_undocumented_fields_are_found():
    source = 'class A:\n    x: int = 1\n    """doc"""\n    y: int = 2\n    z: str = "a"\n'
    assert _undocumented_fields(source) == ["A.y", "A.z"]


@pytest.mark.parametrize("module", ["sections.py", "methods.py", "reward_backprop.py"])
def test_every_config_field_has_a_docstring(module):
    """README's Configs section says the attribute docstrings document every field."""
    assert _undocumented_fields((REPO_ROOT / "t2i_align" / "config" / module).read_text()) == []


def test_configs_folder_has_every_family():
    families = {path.parent.name for path in ALL_YAMLS}
    assert {"toy", "sd15", "sdxl"} <= families


def _leaves(data: dict, prefix: str = ""):
    """(dotted key, value) of every setting in a nested mapping; an empty mapping is a value."""
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_shipped_yaml_loads(path):
    """Each file's own settings (not its base's) are in the loaded config with the values the file gives."""
    own = yaml.safe_load(path.read_text())
    own.pop("base", None)
    loaded = dict(_leaves(config_to_dict(load_config(path))))
    for key, value in _leaves(own):
        if key == "tracking.wandb" and value is False:  # the loader's one conversion: YAML 1.1 reads a bare off
            value = "off"  # as false, which the choice check (sections._check_choice) takes back to the word
        assert loaded[key] == value, key  # == : an int where a float is declared


RECIPES = {  # ../shared/reference: the official launchers and papers; objective, β, lr, scale_lr, per-GPU batch x
    # accumulation, schedule, warm-up, steps, clip, optimizer
    "sd15/dpo_full": ("dpo", 5000.0, 1e-8, True, 1, 128, "constant_with_warmup", 500, 2000, 1.0, "adamw"),
    "sdxl/dpo_full": ("dpo", 5000.0, 1e-8, True, 1, 128, "constant_with_warmup", 200, 2000, 1.0, "adafactor"),
    "sd15/sft_full": ("sft", 5000.0, 1e-8, True, 1, 128, "constant_with_warmup", 500, 2000, 1.0, "adamw"),
    "sd15/seppo": ("seppo", 5000.0, 1e-8, True, 1, 256, "constant_with_warmup", 500, 2000, 1.0, "adamw"),
    "sd15/ppd": ("dpo", 5000.0, 1e-5, False, 4, 24, "constant_with_warmup", 100, 1000, 1.0, "adamw"),
    "sd15/longalign_stage1": ("sft", 5000.0, 3e-5, False, 16, 12, "constant_with_warmup", 2000, 28750, 0.3, "adamw"),
    "sd15/longalign_reward": ("reward_backprop", 5000.0, 3e-5, False, 8, 6, "constant_with_warmup", 2000, 3750, 0.3,
                              "adamw")}


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_keep_the_reference_values(name):
    """The reviewed recipe values pinned (the test above compares each file with itself: a changed value passed)."""
    cfg = load_config(REPO_ROOT / f"configs/{name}.yaml")
    t = cfg.train
    assert (cfg.objective.name, cfg.objective.beta, t.learning_rate, t.scale_lr, t.batch_size, t.grad_accum,
            t.lr_scheduler, t.lr_warmup_steps, t.max_steps, t.max_grad_norm, t.optimizer) == RECIPES[name]
    assert cfg.objective.beta_convention == "official"


def test_shipped_method_sections_keep_the_reference_values():
    stage1 = load_config(REPO_ROOT / "configs/sd15/longalign_stage1.yaml")
    assert (stage1.lora.rank, stage1.lora.alpha, stage1.lora.dropout, stage1.model.text_encoding.kind,
            stage1.model.text_encoding.token_budget) == (32, 32, 0.1, "segments", 240)
    rb = load_config(REPO_ROOT / "configs/sd15/longalign_reward.yaml").reward_backprop
    assert (rb.reward, rb.reward_options["omega"], rb.loss_scale, rb.num_steps, rb.guidance_scale, rb.grad_mode,
            rb.grad_k, rb.detach_input, rb.x0_prediction, rb.timestep_spacing) == (
        "decomposed-clip", 0.3, 0.5, 50, 7.5, "strided", 5, True, True, "trailing")
    dpo = load_config(REPO_ROOT / "configs/sd15/dpo_full.yaml")
    assert (dpo.data.prompt_dropout, dpo.data.crop, dpo.data.resolution) == (0.2, "center", 512)


def test_shipped_base_configs_say_what_they_are():
    toy = load_config(REPO_ROOT / "configs/toy/base.yaml")
    assert (toy.model.pretrained, toy.model.family, toy.model.weight_dtype) == ("toy", "auto", "fp32")
    sd15 = load_config(REPO_ROOT / "configs/sd15/base.yaml")
    assert (sd15.model.family, sd15.model.weight_dtype, sd15.lora.enabled, sd15.lora.rank) == ("sd15", "fp16", True, 8)
    sdxl = load_config(REPO_ROOT / "configs/sdxl/base.yaml")
    assert (sdxl.model.family, sdxl.model.weight_dtype, sdxl.lora.enabled) == ("sdxl", "fp16", True)


def test_defaults_without_a_file():
    assert load_config(None) == Config()


def test_overrides_apply_with_declared_types():
    cfg = load_config(
        REPO_ROOT / "configs/toy/base.yaml",
        ["model.pretrained=/x", "lora.rank=4", "lora.target_modules=[to_q,to_k]", "output_dir=runs/y",
         "lora.alpha=16", "model.revision=1234", "lora.enabled=true"],
    )
    assert cfg.model.pretrained == "/x" and cfg.output_dir == "runs/y"
    assert cfg.lora.rank == 4 and type(cfg.lora.rank) is int
    assert cfg.lora.target_modules == ["to_q", "to_k"] and type(cfg.lora.target_modules) is list
    assert cfg.lora.alpha == 16.0 and type(cfg.lora.alpha) is float
    assert cfg.model.revision == "1234"  # a text setting takes the text as typed
    assert cfg.lora.enabled is True
    assert cfg.model.family == "auto"  # untouched keys keep the file's values


def test_text_settings_take_the_override_as_typed():
    """YAML read output_dir=0001 as 1, 1:30 as 90 (base 60) and 1234e56 as a float, silently."""
    cfg = load_config(None, ["output_dir=0001", "tracking.run_name=1:30", "model.revision=1234e56",
                             "data.path=", "model.vae=", "raft.enabled=true", "raft.prompts=toy:train",
                             "raft.negative_prompt='None'", "tracking.wandb=no"])
    assert (cfg.output_dir, cfg.tracking.run_name, cfg.model.revision) == ("0001", "1:30", "1234e56")
    assert (cfg.data.path, cfg.model.vae, cfg.raft.negative_prompt, cfg.tracking.wandb) == ("", None, "None", "off")
    assert load_config(None, ['tracking.run_name="007"', "tracking.run_name=null"]).tracking.run_name is None
    assert load_config(None, ['tracking.run_name="007"']).tracking.run_name == "007"
    assert load_config(None, ["data.flip=joint", "data.flip=none"]).data.flip == "none"  # a choice, not null
    with pytest.raises(ConfigError, match="raft.negative_prompt=None on the command line: write null"):
        load_config(None, ["raft.enabled=true", "raft.prompts=toy:train", "raft.negative_prompt=None"])


def test_text_settings_in_a_file_and_list_items_are_taken_as_typed(tmp_path):
    """Only the command line's text settings were kept as typed: in a file output_dir: 0001 became '1', 1:30 '90',
    yes 'True', 1e-4 '0.0001'; list items likewise, on the command line too."""
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: 0001\ntracking:\n  run_name: 1e-4\n  validation_prompts: [yes, 0777, 1e3, '0777']\n"
                    "model:\n  revision: 1:30\n  pretrained: yes\n  vae: ~\n")
    cfg = load_config(path)
    assert (cfg.output_dir, cfg.tracking.run_name, cfg.model.revision, cfg.model.pretrained, cfg.model.vae) == (
        "0001", "1e-4", "1:30", "yes", None)
    assert cfg.tracking.validation_prompts == ["yes", "0777", "1e3", "0777"]
    assert load_config(None, ["tracking.validation_prompts=[yes, 0777, 1e3]"]).tracking.validation_prompts == [
        "yes", "0777", "1e3"]
    (tmp_path / "m.yaml").write_text("tracking:\n  <<: {run_name: 0001}\n")  # a merge key
    assert load_config(tmp_path / "m.yaml").tracking.run_name == "0001"
    # merge keys as YAML resolves them: an explicit key wins, the first source wins, a merge is shallow
    for text, run_name in (("run_name: 5\n  <<: {run_name: 7}", "5"), ("<<: [{run_name: 1}, {run_name: 2}]", "1")):
        (tmp_path / "m.yaml").write_text(f"tracking:\n  {text}\n")
        assert load_config(tmp_path / "m.yaml").tracking.run_name == run_name
    (tmp_path / "m.yaml").write_text("model:\n  <<: {text_encoding: {kind: segments}}\n"
                                     "  text_encoding: {token_budget: 200}\n")
    assert load_config(tmp_path / "m.yaml").model.text_encoding.kind == "clip77"


def test_later_override_wins():
    assert load_config(None, ["seed=1", "seed=7"]).seed == 7


def test_unknown_key_in_yaml_names_dotted_key_file_and_valid_keys(tmp_path):
    path = write(tmp_path, "bad.yaml", "lora:\n  rnk: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "lora.rnk" in message and "bad.yaml" in message
    assert "Did you mean 'lora.rank'" in message
    assert "target_modules" in message  # lists the valid keys of the section


def test_unknown_top_level_key_in_override_names_command_line():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["outputdir=runs/x"])
    message = str(info.value)
    assert "outputdir" in message and "command line" in message and "output_dir" in message


def test_unknown_nested_key_in_override():
    with pytest.raises(ConfigError, match=r"model\.pretrianed.*command line"):
        load_config(None, ["model.pretrianed=/x"])


def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["lora.rank=abc"])
    message = str(info.value)
    assert "lora.rank" in message and "'abc'" in message and "expected int" in message
    assert "command line" in message


def test_wrong_type_in_yaml_names_file(tmp_path):
    path = write(tmp_path, "typo.yaml", "lora:\n  alpha: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "lora.alpha" in message and "typo.yaml" in message and "float or null" in message


def test_scalar_where_a_section_belongs(tmp_path):
    path = write(tmp_path, "flat.yaml", "model: /path/to/sd15\n")
    with pytest.raises(ConfigError, match=r"model = '/path/to/sd15' in .*flat\.yaml: expected a section"):
        load_config(path)


def test_list_where_a_list_belongs_is_required():
    with pytest.raises(ConfigError, match=r"lora\.target_modules.*list of str"):
        load_config(None, ["lora.target_modules=to_q"])


@pytest.mark.parametrize(
    "override, key",
    [("model.weight_dtype=fp8", "model.weight_dtype"), ("model.family=sd3", "model.family"),
     ("model.attention=flash", "model.attention"), ("lora.rank=0", "lora.rank"), ("lora.dropout=1.0", "lora.dropout"),
     ("lora.init=pissa", "lora.init"), ("lora.target_modules=[]", "lora.target_modules"), ("seed=-1", "seed"),
     ("train.lr_scheduler=cosine_warmup", "train.lr_scheduler"), ("train.lr_scheduler=piecewise_constant",
                                                                  "train.lr_scheduler"),
     ("data.time_ids=true_size", "data.time_ids"), ("train.learning_rate=.inf", "train.learning_rate"),
     ("objective.beta=.inf", "objective.beta"), ("train.adam_beta1=1.0", "train.adam_beta1"),
     ("train.adam_beta2=-0.1", "train.adam_beta2"), ("train.adam_epsilon=0", "train.adam_epsilon"),
     ("train.weight_decay=-0.01", "train.weight_decay"), ("tracking.guidance_scale=-1", "tracking.guidance_scale"),
     ("raft.guidance_scale=-2.5", "raft.guidance_scale"), ("seppo.guidance_scale=-0.5", "seppo.guidance_scale")],
)
def test_validation_failure_names_the_dotted_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith(f"{key} = ") and "command line" in message and "expected" in message


@pytest.mark.parametrize("override, expected", [
    ("reward_backprop.eta=1.5", r"reward_backprop\.eta = 1\.5 .*expected a number in \[0, 1\]"),
    ("reward_backprop.eta=-0.1", r"reward_backprop\.eta = -0\.1 .*expected a number in \[0, 1\]")])
def test_reward_backprop_eta_is_checked_at_load(override, expected):
    """eta > 1 made DDIM's sqrt(1 - ᾱ_prev - σ²) NaN."""
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["objective.name=reward_backprop", override])
    load_config(None, ["objective.name=reward_backprop", "reward_backprop.eta=1"])


@pytest.mark.parametrize("setting", ["reward_backprop", "raft"])
def test_a_reward_option_outside_its_range_is_refused_before_the_model_loads(setting):
    """decomposed-clip's omega=5 passed --dry-run and failed only once the model had loaded."""
    from t2i_align.build import check_before_loading

    method = ["objective.name=reward_backprop"] if setting == "reward_backprop" else \
        ["raft.enabled=true", "objective.name=sft", "raft.prompts=toy:train"]
    reward = [f"{setting}.reward=decomposed-clip", f"{setting}.reward_options.checkpoint=toy",
              f"{setting}.reward_options.fit_prompts=toy:train"]
    for omega in (5, -0.3):
        cfg = load_config(None, [*method, *reward, f"{setting}.reward_options.omega={omega}"])
        with pytest.raises(ConfigError, match=rf"{setting}.reward: reward 'decomposed-clip' option omega={omega} is "
                                              r"outside \[0, 1\] \(the weight kept on the text-irrelevant part"):
            check_before_loading(cfg, "images", gallery_weights=False, data_files=False)
    cfg = load_config(None, [*method, *reward, f"{setting}.reward_options.omega=1"])
    check_before_loading(cfg, "images", gallery_weights=False, data_files=False)


def test_a_constant_schedule_with_warm_up_steps_is_refused():
    """diffusers' "constant" has no warm-up: the steps were dropped without a word."""
    with pytest.raises(ConfigError, match="train.lr_warmup_steps = 10 .* constant_with_warmup has"):
        load_config(None, ["train.lr_scheduler=constant", "train.lr_warmup_steps=10"])
    assert load_config(None, ["train.lr_warmup_steps=10"]).train.lr_scheduler == "constant_with_warmup"


def test_lr_schedules_are_diffusers_and_an_8bit_optimizer_needs_bitsandbytes(monkeypatch):
    """train.lr_scheduler is checked at config load (it was checked after the model and the latent cache) against
    a copy of diffusers' names; adamw8bit without bitsandbytes was an ImportError traceback at the same place."""
    import importlib.util

    from diffusers.optimization import SchedulerType

    from t2i_align.config.sections import LR_SCHEDULES

    assert {*LR_SCHEDULES, "piecewise_constant"} == {kind.value for kind in SchedulerType}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ConfigError, match=r"train\.optimizer = 'adamw8bit'.*expected adamw8bit with bitsandbytes "
                                          r"installed \(pip install 't2i-align\[8bit\]'"):
        load_config(None, ["train.optimizer=adamw8bit"])


def test_validation_failure_from_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "dtype.yaml", "model:\n  weight_dtype: fp8\n")
    with pytest.raises(ConfigError, match=r"model\.weight_dtype = 'fp8' in .*dtype\.yaml: expected one of fp32"):
        load_config(path)


def test_dataclasses_validate_when_built_in_python():
    with pytest.raises(ConfigError, match="LoraConfig.dropout"):
        LoraConfig(dropout=-0.1)
    with pytest.raises(ConfigError, match="ModelConfig.weight_dtype = 'fp8'"):
        ModelConfig(weight_dtype="fp8")
    assert LoraConfig(init="default").init == "default"


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"not found: .*nope\.yaml"):
        load_config(missing)


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "broken.yaml", "lora:\n  target_modules: [to_q\n")
    with pytest.raises(ConfigError, match=r"Invalid YAML in .*broken\.yaml"):
        load_config(path)


@pytest.mark.parametrize("text", ["train:\n  max_steps:\t5\n", "output_dir: x\t# a comment\n"])
def test_a_tab_omegaconf_reads_but_pyyaml_refuses_is_one_config_error(tmp_path, text):
    """OmegaConf loaded these, then the second, plain PyYAML pass raised a ScannerError traceback."""
    path = write(tmp_path, "tab.yaml", text)
    with pytest.raises(ConfigError, match=r"Invalid YAML in .*tab\.yaml, line \d+ column \d+: .*separate and indent "
                                          "with spaces"):
        load_config(path)


def test_top_level_list_is_rejected(tmp_path):
    path = write(tmp_path, "list.yaml", "- seed\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


@pytest.mark.parametrize("override", ["lora.rank", "=4", "lora..rank=4", "--lora.rank=4", "lora.target_modules=[a"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="Malformed override"):
        load_config(None, [override])


def test_a_config_file_given_without_config_is_named():
    """`train.py configs/toy/dpo.yaml ...` (the flag forgotten) said only "Malformed override"."""
    with pytest.raises(ConfigError, match="is a config file, not a key=value override: pass it as --config "
                                          "configs/toy/dpo.yaml"):
        load_config(None, ["configs/toy/dpo.yaml"])


def test_base_file_is_merged_first(tmp_path):
    write(tmp_path, "parent.yaml", "seed: 3\nlora:\n  enabled: true\n  rank: 2\n")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub", "child.yaml", "base: ../parent.yaml\nlora:\n  rank: 16\n")
    cfg = load_config(child, ["seed=5"])
    assert (cfg.seed, cfg.lora.enabled, cfg.lora.rank) == (5, True, 16)


def test_base_errors_name_the_right_file(tmp_path):
    write(tmp_path, "parent.yaml", "lora:\n  rnk: 2\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\n")
    with pytest.raises(ConfigError, match=r"lora\.rnk.*parent\.yaml"):
        load_config(child)
    loop = write(tmp_path, "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="Circular"):
        load_config(loop)


def test_save_config_round_trips(tmp_path):
    cfg = load_config(REPO_ROOT / "configs/sdxl/base.yaml", ["lora.rank=4", "lora.alpha=8"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    # texts OmegaConf's YAML reads as numbers (PyYAML wrote 1e3 bare), in a mapping setting too
    cfg = load_config(REPO_ROOT / "configs/toy/raft.yaml", ["model.revision=1234e56", "tracking.run_name=5e3",
                                                           "raft.reward_options={x: '1e3'}"])
    save_config(cfg, out)
    assert load_config(out) == cfg and load_config(out).raft.reward_options == {"x": "1e3"}
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_unresolvable_interpolation_is_a_config_error():
    assert load_config(None, ["seed=3", "output_dir=runs/${seed}"]).output_dir == "runs/3"
    with pytest.raises(ConfigError, match=r"output_dir in command line.*oops"):
        load_config(None, ["output_dir=${oops}"])


def test_bare_no_in_yaml_means_no_mixed_precision(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_empty_mapping_clears_options_set_by_a_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("raft:\n  enabled: true\n  prompts: toy:train\n"
                                        "  reward_options: {weights: /a, device: cpu}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nraft:\n  reward_options: {weights: /b}\n")
    assert load_config(tmp_path / "run.yaml").raft.reward_options == {"weights": "/b", "device": "cpu"}  # merged
    assert load_config(tmp_path / "run.yaml", ["raft.reward_options={}"]).raft.reward_options == {}
    (tmp_path / "clear.yaml").write_text("base: base.yaml\nraft:\n  reward_options: {}\n")
    assert load_config(tmp_path / "clear.yaml").raft.reward_options == {}
    (tmp_path / "empty_section.yaml").write_text("base: base.yaml\nlora: {rank: 2}\ntrain: {}\n")
    cfg = load_config(tmp_path / "empty_section.yaml", ["lora={}"])
    assert cfg.lora.rank == 2 and cfg.raft.reward_options == {"weights": "/a", "device": "cpu"}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_frozen_weights_without_mixed_precision_are_refused_at_load(tmp_path, dtype):
    """Issue 10, bug 3: this combination used to load and then die in F.linear on the first forward."""
    with pytest.raises(ConfigError) as info:
        load_config(REPO_ROOT / "configs/toy/dpo.yaml", [f"model.weight_dtype={dtype}"])
    message = str(info.value)
    assert message.startswith(f"model.weight_dtype = '{dtype}' in command line")
    assert f"train.mixed_precision={dtype}" in message and "model.weight_dtype=fp32" in message
    path = write(tmp_path, "half.yaml", f"model:\n  weight_dtype: {dtype}\ntrain:\n  mixed_precision: no\n")
    with pytest.raises(ConfigError, match=r"half\.yaml"):
        load_config(path)
    # with autocast the fp32 trained UNet and the half-precision frozen parts meet (diffusers' scripts' setup)
    assert load_config(path, [f"train.mixed_precision={dtype}"]).model.weight_dtype == dtype
    assert load_config(path, ["train.mixed_precision=bf16"]).model.weight_dtype == dtype


def test_bare_off_in_yaml_or_an_override_is_the_word_off(tmp_path):
    # YAML 1.1 reads `off` as false; seppo.flip's choice "off" must survive both a file and a command-line override.
    path = tmp_path / "c.yaml"
    path.write_text("objective:\n  name: seppo\nseppo:\n  flip: off\n")
    assert load_config(path, []).seppo.flip == "off"
    assert load_config(path, ["seppo.flip=sign"]).seppo.flip == "sign"
    assert load_config(path, ["seppo.flip=indicator", "seppo.flip=off"]).seppo.flip == "off"
    with pytest.raises(ConfigError, match="seppo.flip"):
        load_config(path, ["seppo.flip=yes"])


def test_an_override_in_a_switched_off_section_is_refused():
    """`lora.rank=4` without lora.enabled trained the whole UNet, the override ignored without a word; config
    files may keep switched-off settings."""
    with pytest.raises(ConfigError, match="lora.rank is set on the command line, but lora.enabled is false"):
        load_config(None, ["lora.rank=4"])
    with pytest.raises(ConfigError, match="add raft.enabled=true"):
        load_config(None, ["raft.k=4"])
    with pytest.raises(ConfigError, match="seppo.pool_size is set on the command line, but objective.name is 'dpo'"):
        load_config(None, ["seppo.pool_size=3"])
    with pytest.raises(ConfigError, match="add objective.name=reward_backprop"):
        load_config(None, ["objective.name=sft", "reward_backprop.reward=toy-clip"])
    assert load_config(None, ["objective.name=seppo", "seppo.pool_size=3"]).seppo.pool_size == 3
    assert load_config(None, ["lora.enabled=true", "lora.rank=4"]).lora.rank == 4
    assert load_config(None, ["ppd.enabled=false"]).ppd.enabled is False
    # ppd.scale 0 skips the branch: nothing trains, and the first step raised a bare "does not require grad"
    with pytest.raises(ConfigError, match="ppd.scale.*a number > 0 when ppd.enabled"):
        load_config(None, ["ppd.enabled=true", "ppd.table=u.safetensors", "ppd.scale=0"])
    # a whole section as one override, DPO's loss settings without a DPO loss, pair data under RAFT
    with pytest.raises(ConfigError, match="lora.rank is set on the command line, but lora.enabled is false"):
        load_config(None, ["lora={rank: 4}"])
    with pytest.warns(UserWarning, match=r"objective.beta .* objective.name is 'sft' \(no DPO loss\): it has no"):
        load_config(None, ["objective.name=sft", "objective.beta=100"])
    with pytest.raises(ConfigError, match="tracking.validation_reward_options is set .* tracking.validation_reward is"):
        load_config(None, ["tracking.validation_reward_options.checkpoint=x"])
    raft = ["raft.enabled=true", "raft.prompts=toy:train"]
    with pytest.warns(UserWarning, match="data.cache is set .* raft.enabled is true"):
        load_config(None, [*raft, "data.cache=true"])
    with pytest.warns(UserWarning, match=r"data.resolution is set .* own samples \(their size is raft.resolution\)"):
        load_config(None, [*raft, "data.resolution=256"])
    with pytest.warns(UserWarning, match="data.flip is set .* raft.enabled is true"):
        load_config(None, [*raft, "data.flip=joint"])
    with pytest.warns(UserWarning, match="train.offload_reference is set .* only a full fine-tune keeps a frozen"):
        load_config(None, ["lora.enabled=true", "train.offload_reference=true"])
    # data settings the data.kind reads none of (a prompts file is text, captions are served in order)
    for kind, key in (("prompts", "data.ties=first"), ("captions", "data.shuffle_window=8"),
                      ("prompts", "data.cache=true")):
        with pytest.warns(UserWarning, match=f"{key.split('=')[0]} is set .* data.kind is '{kind}': it has no"):
            load_config(None, [f"data.kind={kind}", key])
    with pytest.warns(UserWarning, match=r"data.shuffle_window is set .* data.cache is true \(cached data"):
        load_config(None, ["data.cache=true", "data.shuffle_window=8"])
    # SePPO's pool without snapshots, the flipper's draws without a flipper
    seppo = ["objective.name=seppo"]
    with pytest.warns(UserWarning, match=r"seppo.pool_size is set .* seppo.reference is 'initial'"):
        load_config(None, [*seppo, "seppo.reference=initial", "seppo.pool_size=3"])
    with pytest.warns(UserWarning, match=r"seppo.anchor_draws is set .* seppo.flip is 'off'"):
        load_config(None, [*seppo, "seppo.flip=off", "seppo.anchor_draws=4"])
    with pytest.warns(UserWarning, match=r"lora.dropout=0.1 with SePPO's flipper: .* tilts s towards -1"):
        load_config(None, [*seppo, "lora.enabled=true", "lora.dropout=0.1"])
    with warnings.catch_warnings():  # what is read, or only cleared, says nothing
        warnings.simplefilter("error")
        assert load_config(None, [*raft, "data.path=", "data.prompt_dropout=0.2"]).data.prompt_dropout == 0.2
        assert load_config(None, ["data.kind=captions", "data.cache=true"]).data.cache
        assert load_config(None, ["data.kind=prompts", "data.max_pairs=2"]).data.max_pairs == 2
        assert load_config(None, ["objective.name=seppo", "objective.beta=100"]).objective.beta == 100


def test_yaml_none_non_finite_numbers_and_an_empty_raft_reward_are_refused(tmp_path, monkeypatch):
    """YAML reads None as the text "None" (a negative prompt "None", a cache folder named None); inf / nan were
    taken where no check named them; `raft.reward=` failed only once the model had loaded."""
    path = write(tmp_path, "none.yaml", "raft:\n  negative_prompt: None\n")
    with pytest.raises(ConfigError, match="raft.negative_prompt: None in .*none.yaml is the text 'None' in YAML: "
                                          "write null"):
        load_config(path)
    merged = write(tmp_path, "merged.yaml", "base: &b {negative_prompt: None}\nraft:\n  <<: [*b]\n  enabled: false\n")
    with pytest.raises(ConfigError, match="raft.negative_prompt: None in .*merged.yaml"):  # through a merge key
        load_config(merged)
    quoted = write(tmp_path, "quoted.yaml", "raft:\n  negative_prompt: 'None'\n")  # the text, meant
    cfg = load_config(quoted, ["tracking.run_name='none'"])
    assert (cfg.raft.negative_prompt, cfg.tracking.run_name) == ("None", "none")
    save_config(cfg, tmp_path / "saved.yaml")  # a run's config.yaml reads back
    again = load_config(tmp_path / "saved.yaml")
    assert (again.raft.negative_prompt, again.tracking.run_name) == ("None", "none")
    for item in ("lora.alpha=inf", "tracking.guidance_scale=inf", "raft.min_gap=inf"):
        with pytest.raises(ConfigError, match=f"{item.split('=')[0]} = .*: expected a finite number"):
            load_config(None, ["lora.enabled=true", item])
    with pytest.raises(ConfigError, match="raft.reward"):
        load_config(None, ["raft.enabled=true", "raft.prompts=toy:train", "raft.reward="])
    monkeypatch.setenv("HOME", str(tmp_path))  # --config=~/x.yaml (bash leaves that ~ alone)
    write(tmp_path, "null.yaml", "raft:\n  negative_prompt: null\n")
    assert load_config("~/null.yaml").raft.negative_prompt is None


def test_scale_lr_multiplies_the_lr_by_the_pairs_per_optimizer_step():
    """The official Diffusion-DPO launchers' scaling: 1e-8 × 1 pair × 128 accumulation × 16 GPUs = 2.048e-5.
    Without train.scale_lr the LR is used as set."""
    from t2i_align.optim import effective_lr

    scaled = load_config(None, ["train.learning_rate=1e-8", "train.scale_lr=true", "train.batch_size=1",
                                "train.grad_accum=128"]).train
    assert effective_lr(scaled, num_processes=16) == pytest.approx(2.048e-5, rel=1e-12)
    plain = load_config(None, ["train.learning_rate=1e-8", "train.batch_size=4", "train.grad_accum=2"]).train
    assert effective_lr(plain, num_processes=16) == 1e-8


def test_an_optimizer_over_no_parameters_is_refused():
    from t2i_align.optim import make_optimizer

    with pytest.raises(ConfigError, match="no trainable parameters: check lora.enabled"):
        make_optimizer([], load_config(None, []).train, lr=1e-3)


@pytest.mark.parametrize("overrides", [["model.cast_base_unet=true"],
                                       ["model.cast_base_unet=true", "lora.enabled=true"],
                                       ["model.cast_base_unet=true", "model.weight_dtype=bf16",
                                        "train.mixed_precision=bf16", "lora.enabled=false"]])
def test_casting_the_base_unet_needs_adapters_and_a_half_precision_weight_dtype(overrides):
    with pytest.raises(ConfigError, match=r"^model.cast_base_unet = True.*adapters.*weight_dtype is fp16 or bf16"):
        load_config(None, overrides)
    assert load_config(None, ["model.cast_base_unet=true", "lora.enabled=true", "model.weight_dtype=bf16",
                              "train.mixed_precision=bf16"]).model.cast_base_unet


@pytest.mark.parametrize("override, message", [
    ("reward_backprop.reward_options=[a]", r"reward_backprop\.reward_options = \['a'\] in command line .*expected "
                                           r"mapping \(\{key: value\}\), not a list"),
    ("tracking.validation_prompts={a: b}", r"tracking\.validation_prompts = \{'a': 'b'\} in command line .*expected "
                                           r"list of str \(\[a, b\]\), not a mapping"),
    ("lora.target_modules={to_q: 1}", r"lora\.target_modules = \{'to_q': 1\} in command line .*not a mapping")])
def test_a_list_where_a_mapping_belongs_or_the_reverse_names_the_key(override, message):
    """OmegaConf's merge failed with `TypeError: Cannot merge incompatible container types`, naming no key."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_list_where_a_mapping_belongs_in_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "opts.yaml", "raft: {reward_options: [a, b]}\n")
    with pytest.raises(ConfigError, match=r"^raft\.reward_options = \['a', 'b'\] in .*opts\.yaml: expected mapping"):
        load_config(path)


def test_items_of_a_text_list_must_be_text(tmp_path):
    """YAML reads an unquoted `a: b` or `{...}` inside a list as a mapping; it reached the tokenizer."""
    path = write(tmp_path, "prompts.yaml", "tracking:\n  validation_prompts: [a cat, {style: watercolor, a fox}]\n")
    with pytest.raises(ConfigError, match=r"^tracking\.validation_prompts\[1\] = \{'style': 'watercolor', 'a fox': "
                                          r"None\} in .*prompts\.yaml is a mapping, expected text: quote items"):
        load_config(path)
    path = write(tmp_path, "block.yaml", "tracking:\n  validation_prompts:\n    - a cat\n    - style: watercolor\n")
    with pytest.raises(ConfigError, match=r"validation_prompts\[1\] = \{'style': 'watercolor'\} .* is a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^lora\.target_modules\[1\] = \['to_k', 'to_v'\] in command line .* is "
                                          r"a list, expected text"):
        load_config(None, ["lora.enabled=true", "lora.target_modules=[to_q, [to_k, to_v]]"])


def test_a_null_item_of_a_text_list_says_text_was_expected(tmp_path):
    path = write(tmp_path, "null.yaml", "tracking:\n  validation_prompts: [a, b, c, null]\n")
    with pytest.raises(ConfigError, match=r"^tracking\.validation_prompts\[3\] = None in .*null\.yaml: expected str "):
        load_config(path)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "unet.safetensors"
    path.write_bytes(b"\x99\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\"")
    with pytest.raises(ConfigError, match=r"unet\.safetensors is not a UTF-8 YAML file"):
        load_config(path)


def test_an_accelerate_config_given_as_the_run_config_says_where_it_goes():
    with pytest.raises(ConfigError, match=r"fsdp\.yaml is an accelerate config: .*--config_file"):
        load_config(REPO_ROOT / "configs/accelerate/fsdp.yaml")


def test_sdxl_below_its_native_resolution_is_noted(capsys):
    from t2i_align.build import _note_resolution
    from t2i_align.models import SD15, SDXL

    class Acc:
        def print(self, *args, **kwargs):
            print(*args, **kwargs)

    _note_resolution(load_config(None, ["model.pretrained=/models/sdxl"]), SDXL, Acc())
    assert "note: data.resolution=512 is below sdxl's native 1024 px" in capsys.readouterr().err
    raft = ["model.pretrained=/models/sdxl", "raft.enabled=true", "raft.prompts=toy:train"]  # raft.resolution
    for overrides, spec in ((["data.resolution=1024"], SDXL), (["model.pretrained=/models/sdxl-turbo"], SDXL),
                            ([], SD15), (raft, SDXL)):
        _note_resolution(load_config(None, overrides), spec, Acc())
    assert capsys.readouterr().err == ""


def test_a_warm_up_as_long_as_the_run_is_noted(capsys):
    """The LR never reached its peak, silently; told, not refused (a smoke run of a recipe does it on purpose)."""
    from t2i_align.build import _note_warm_up

    class Acc:
        def print(self, *args, **kwargs):
            print(*args, **kwargs)

    _note_warm_up(load_config(None, ["train.max_steps=100", "train.lr_warmup_steps=100"]), Acc())
    assert "note: train.lr_warmup_steps=100 is not below train.max_steps=100" in capsys.readouterr().err
    _note_warm_up(load_config(None, ["train.max_steps=100", "train.lr_warmup_steps=99"]), Acc())
    _note_warm_up(load_config(None, ["train.max_steps=5", "train.lr_warmup_steps=0", "train.lr_scheduler=constant"]),
                  Acc())
    assert capsys.readouterr().err == ""


def test_home_is_expanded_in_path_settings_only(tmp_path, monkeypatch):
    """`output_dir: ~/runs/x` made a folder named ~ in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["output_dir=~/runs/x", "data.path=~/pairs.parquet", "data.cache_dir=~/cache",
                             "train.resume=~/runs/x/checkpoints/step-5", "tracking.validation_prompts=[~/not a path]"])
    assert (cfg.output_dir, cfg.data.path, cfg.data.cache_dir) == (f"{tmp_path}/runs/x", f"{tmp_path}/pairs.parquet",
                                                                   f"{tmp_path}/cache")
    assert cfg.train.resume == f"{tmp_path}/runs/x/checkpoints/step-5"
    assert load_config(None, ["raft.enabled=true", "raft.prompts=~/prompts.txt"]).raft.prompts == \
        f"{tmp_path}/prompts.txt"
    assert cfg.tracking.validation_prompts == ["~/not a path"]
    assert load_config(None, ["ppd.enabled=true", "ppd.table=~/users.safetensors"]).ppd.table \
        == f"{tmp_path}/users.safetensors"
    assert load_config(None, ["train.resume=latest"]).train.resume == "latest"
    write(tmp_path, "parent.yaml", "seed: 11\n")
    (tmp_path / "sub").mkdir()
    assert load_config(write(tmp_path / "sub", "child.yaml", "base: ~/parent.yaml\n")).seed == 11


@pytest.mark.parametrize("override, hint", [
    ("max_steps=5", "Did you mean 'train.max_steps'?"), ("learning_rate=1e-4", "Did you mean 'train.learning_rate'?"),
    ("mixed_precision=bf16", "Did you mean 'train.mixed_precision'?"),
    ("gradient_accumulation_steps=4", "Did you mean 'train.grad_accum'?"),
    ("model.resolution=512", "Did you mean 'data.resolution' or 'raft.resolution'?"),
    ("text_encoding.kind=segments", "Did you mean 'model.text_encoding'?"),
    ("beta_dpo=2500", "Did you mean 'objective.beta'? (diffusers' SD1.5 script's beta_dpo is objective.beta with "
                      "objective.beta_convention=diffusers: its 2500 is the official 5000)"),
    ("proportion_empty_prompts=0.2", "Did you mean 'data.prompt_dropout'?"),
    ("dreamlike_pairs_only=true", "Did you mean 'data.both_models_contain'? (the official flag is "
                                  "data.both_models_contain=dream)"),
    ("lr=1e-4", "Did you mean 'train.learning_rate'?"), ("train.lr=1e-4", "Did you mean 'train.learning_rate'?"),
    ("optim.lr=1e-4", "Did you mean 'train.optimizer'?"),
    ("num_train_epochs=3", "Did you mean 'train.max_steps'? (runs are counted in optimizer steps, not epochs)")])
def test_an_unknown_key_suggests_the_setting_of_that_name_in_another_section(override, hint):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert hint in str(info.value)


def test_one_item_where_a_list_belongs_says_how_to_write_the_list(tmp_path):
    with pytest.raises(ConfigError, match=r"lora.target_modules = 'to_q' in command line .*: expected list of str: "
                                          r"write one item as a list, lora.target_modules=\[to_q\]"):
        load_config(None, ["lora.enabled=true", "lora.target_modules=to_q"])
    path = write(tmp_path, "one.yaml", "tracking:\n  validation_prompts: a red circle\n")
    with pytest.raises(ConfigError, match=r"tracking.validation_prompts = 'a red circle' in .*one.yaml: expected"):
        load_config(path)


@pytest.mark.parametrize("override", ["output_dir= /tmp/x", "data.path=/data/p.parquet ", "model.pretrained= toy"])
def test_a_path_with_a_space_at_an_end_is_refused(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=f"{key} = .* begins or ends with a space"):
        load_config(None, [override])


def test_a_shell_word_split_from_its_value_says_to_quote(tmp_path):
    with pytest.raises(ConfigError, match="Malformed override 'run' .*tracking.run_name='my run'"):
        load_config(None, ["tracking.run_name=my", "run"])


def test_a_relative_config_or_data_path_names_the_working_directory(tmp_path, monkeypatch):
    from t2i_align.data.images import find_parquet_files

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"not found: configs/x.yaml \\(relative to the working directory {tmp_path}"):
        load_config("configs/x.yaml")
    with pytest.raises(FileNotFoundError, match="pair data runs/p.parquet \\(relative to the working directory "):
        find_parquet_files("runs/p.parquet")


def test_a_value_is_not_offered_a_section_of_a_close_name():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["lor=1"])  # "lora" is a section, not a value
    assert "Did you mean" not in str(info.value)
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        load_config(None, ["lor.rank=4"])  # a mapping: the section is what it meant


def test_a_negative_prompt_without_guidance_is_refused():
    """At guidance 1 or less there is no classifier-free guidance: the negative prompt went unused (the sample
    scripts refuse --negative-prompt there too)."""
    with pytest.raises(ConfigError, match=r"^raft\.negative_prompt = 'blurry' in command line .*: expected null with "
                                          r"guidance_scale 1 or less"):
        load_config(None, ["raft.enabled=true", "raft.prompts=toy:train", "raft.negative_prompt=blurry",
                           "raft.guidance_scale=1"])
    assert load_config(None, ["raft.enabled=true", "raft.prompts=toy:train", "raft.negative_prompt=blurry",
                              "raft.guidance_scale=1.5"]).raft.negative_prompt == "blurry"


def test_a_key_set_twice_on_the_command_line_is_warned():
    """`train.max_steps=2 ... train.max_steps=3` took the last value without a word; the same value twice is fine."""
    with pytest.warns(UserWarning, match=r"train\.max_steps is set twice on the command line \(train\.max_steps=2, "
                                         r"then train\.max_steps=3\): the last one counts"):
        assert load_config(None, ["train.max_steps=2", "train.batch_size=2", "train.max_steps=3"]).train.max_steps == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["train.max_steps=2", "train.max_steps=2"])
