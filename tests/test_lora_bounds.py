"""LoRA settings checked against the base's real modules before any weight loads (tiny base: hidden 64, 2 KV heads
of 16, so k_proj and v_proj are 64 -> 32)."""

from __future__ import annotations

import pytest

from cogumi.core.basecompat import check_lora_against_base
from cogumi.core.config import LoraConfig
from cogumi.core.errors import UserError


def refusal(tiny_model_dir, **lora) -> UserError:
    with pytest.raises(UserError) as err:
        check_lora_against_base(LoraConfig(**lora), tiny_model_dir)
    return err.value


def test_sane_settings_pass(tiny_model_dir):
    check_lora_against_base(LoraConfig(r=16), tiny_model_dir)
    check_lora_against_base(LoraConfig(r=32, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 64},
                                       alpha_pattern={"v_proj": 8}), tiny_model_dir)


def test_a_rank_above_a_modules_smaller_side_is_refused_naming_it(tiny_model_dir):
    err = refusal(tiny_model_dir, r=48)
    assert "k_proj" in err.what and "32 out" in err.what and "lora.r <= 32" in err.fix
    err = refusal(tiny_model_dir, r=100000, target_modules=["q_proj"])  # the user's 819 M-parameter case
    assert "q_proj" in err.what and "lora.r <= 64" in err.fix
    assert "v_proj" in refusal(tiny_model_dir, r=8, rank_pattern={"v_proj": 33}).what


@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
def test_a_pattern_key_that_matches_no_trained_module_is_refused(tiny_model_dir, pattern):
    err = refusal(tiny_model_dir, target_modules=["q_proj"], **{pattern: {"v_proj": 8}})
    assert "'v_proj' matches none" in err.what and pattern in err.where
    assert "matches none" in refusal(tiny_model_dir, **{pattern: {"nope_proj": 8}}).what


@pytest.mark.parametrize("rank_pattern", [{"q_proj": 0}, {"q_proj": "big"}, {"q_proj[": 8}])
def test_bad_pattern_values_and_keys_are_refused(tiny_model_dir, rank_pattern):
    refusal(tiny_model_dir, rank_pattern=rank_pattern)


def test_training_refuses_it_before_loading_weights(tmp_path, tiny_base, memorised_data):
    from train_helpers import write_config
    from train_phase1a_fullprecision import main

    config = write_config(tmp_path, tiny_base, memorised_data)
    with pytest.raises(UserError, match="exceeds"):
        main(["--phase", str(config), "lora.r=100000"])
    assert not (tmp_path / "out" / "tinyrun").exists()  # no run folder: refused before anything was written
