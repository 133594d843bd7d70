"""Every shipped config loads through the real loader; mistakes fail at load naming file, key and the fix."""

from pathlib import Path

import pytest

from cogumi.core.config import CONFIG_DIR, PhaseConfig, load_config, phase_config_path
from cogumi.core.errors import UserError

SHIPPED = sorted(CONFIG_DIR.rglob("*.y*ml"))  # every shipped YAML is a phase config


def test_configs_exist():
    # A glob that silently matches nothing would make the next test pass vacuously (torchtune's bug).
    names = {p.name for p in SHIPPED}
    assert len(SHIPPED) > 0
    assert {"phase1a.yaml", "phase1b.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_config_loads(path: Path):
    config = load_config(path)
    assert isinstance(config, PhaseConfig)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), "every config opens with a comment header"
    assert "make " in text.split("\n\n")[0], "the header names the exact make command"


def test_phase_configs_match_the_project():
    one_a = load_config(phase_config_path("1a"))
    assert one_a.base_model == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert (one_a.checkpoints.save_steps, one_a.checkpoints.keep_last) == (2000, 2)
    assert one_a.data.train_path == "data/phase1a/train.jsonl"
    assert one_a.run_dir.name == "phase1a"
    one_b = load_config(phase_config_path("1b"))
    assert one_b.base_model == "checkpoints/phase1a_merged"
    assert one_b.run_dir.name == "phase1b"


def test_unknown_key_names_file_key_and_closest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rte: 1.0e-4\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    text = err.value.render()
    assert str(path) in text and "train.learning_rte" in text and "train.learning_rate" in text


def test_unknown_override_key_is_caught(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("name: ok\n")
    with pytest.raises(UserError) as err:
        load_config(path, ["lora.rank=8"])
    assert "lora.rank" in err.value.render() and "lora.r" in err.value.render()


def test_overrides_beat_yaml_beat_defaults(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  max_steps: 100\n  learning_rate: 1.0e-3\n")
    config = load_config(path, ["train.max_steps=7", "lora.target_modules=[q_proj,v_proj]", "data.packing=true"])
    assert config.train.max_steps == 7
    assert config.train.learning_rate == 1e-3  # from the YAML
    assert config.train.grad_accum == PhaseConfig().train.grad_accum  # from the code default
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.packing is True
    assert config.name == "p"


@pytest.mark.parametrize("override, key", [("train.max_steps=abc", "train.max_steps"),
                                            ("data.packing=3", "data.packing"),
                                            ("lora.r=null", "lora.r"),
                                            ("train.learning_rate=[1]", "train.learning_rate")])
def test_type_errors_name_the_key(tmp_path, override, key):
    path = tmp_path / "t.yaml"
    path.write_text("name: t\n")
    with pytest.raises(UserError) as err:
        load_config(path, [override])
    assert key in err.value.render()


def test_int_is_accepted_for_float(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("train:\n  epochs: 2\n")
    assert load_config(path).train.epochs == 2.0


def test_impossible_values_fail_at_load(tmp_path):
    path = tmp_path / "i.yaml"
    path.write_text("checkpoints:\n  keep_last: 0\n")
    with pytest.raises(UserError, match="keep_last"):
        load_config(path)


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # PyYAML reads `2e-4` as a string (YAML 1.1); `make train ARGS="train.learning_rate=1e-4"` must still work.
    path = tmp_path / "e.yaml"
    path.write_text("train:\n  learning_rate: 2e-4\n")
    assert load_config(path).train.learning_rate == 2e-4
    assert load_config(path, ["train.learning_rate=1e-4"]).train.learning_rate == 1e-4
    with pytest.raises(UserError, match="train.learning_rate"):
        load_config(path, ["train.learning_rate=fast"])


def test_phase_configs_use_the_fast_path_layout():
    for phase in ("1a", "1b"):
        train = load_config(phase_config_path(phase)).train
        assert train.checkpoint_layers == "auto" and train.memory_budget_gib is None
        assert load_config(phase_config_path(phase)).lora.dropout == 0.0  # the fused bf16 LoRA needs 0


@pytest.mark.parametrize("override, key", [("train.checkpoint_layers=some", "train.checkpoint_layers"),
                                            ("train.checkpoint_layers=-1", "train.checkpoint_layers"),
                                            ("train.memory_budget_gib=40", "train.memory_budget_gib"),
                                            ("train.grad_accum=0", "train.grad_accum")])
def test_impossible_layout_settings_fail_at_load(tmp_path, override, key):
    path = tmp_path / "t.yaml"
    path.write_text("train:\n  checkpoint_layers: all\n")
    with pytest.raises(UserError, match=key.replace(".", "[.]")):
        load_config(path, [override])


def test_layout_settings_combine_with_the_checkpointing_switch(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("train:\n  checkpoint_layers: all\n")
    with pytest.raises(UserError, match="gradient_checkpointing"):
        load_config(path, ["train.gradient_checkpointing=false", "train.checkpoint_layers=8"])
    assert load_config(path, ["train.checkpoint_layers=auto", "train.memory_budget_gib=40"]).train.memory_budget_gib \
        == 40.0


def _refusal(path: Path, overrides: list[str] | None = None) -> UserError:
    with pytest.raises(UserError) as err:
        load_config(path, overrides)
    return err.value


def test_a_key_or_section_given_twice_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  learning_rate: 2.0e-4\n  max_steps: 5\nlora:\n  r: 8\ntrain:\n  max_steps: 9\n")
    err = _refusal(path)  # YAML alone would keep the second train: and drop the learning rate
    assert "'train' appears twice" in err.what and "lines 1 and 6" in err.what
    assert err.where == f"{path}:6"
    path.write_text("lora:\n  r: 8\n  r: 16\n")
    assert "'r' appears twice" in _refusal(path).what


@pytest.mark.parametrize("text, words", [("- train\n- lora\n", "top level must be a mapping"),
                                         ("just a string\n", "top level must be a mapping")])
def test_a_top_level_that_is_not_a_mapping_is_refused(tmp_path, text, words):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    assert words in _refusal(path).what


def test_a_config_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  max_steps: 5\n# caf\u00e9\n".encode("latin-1"))
    err = _refusal(path)
    assert "not UTF-8" in err.what and err.where == f"{path}:3"


@pytest.mark.parametrize("override", ["train.learning_rate=.nan", "train.learning_rate=.inf",
                                      "train.warmup_ratio=.NaN", "lora.dropout=-.inf"])
def test_nan_and_infinity_are_refused(tmp_path, override):
    path = tmp_path / "p.yaml"
    path.write_text("lora:\n  r: 8\n")
    err = _refusal(path, [override])
    assert "finite number" in err.what and override.split("=")[0] in err.where
