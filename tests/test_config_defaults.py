"""The code's defaults and the phase YAMLs differ only where this file says why: a new difference (a YAML edited, a
default changed) fails here until it is listed with its reason, so the two cannot drift apart unnoticed."""

from __future__ import annotations

import dataclasses

import pytest

from cogumi.core.config import PhaseConfig, load_config, phase_config_path

# key -> why the phases differ from the code's default (the code's defaults suit the tiny CPU runs of tests and
# scripts that do not name a phase; the phases are the 8B GPU runs)
BOTH = {
    "name": "each phase is its own run folder",
    "data.train_path": "each phase has its own data file",
    "data.eval_fraction": "the phases hold out 1 %; a config without it trains on every row (old runs resume)",
    "train.eval_every": "on the 8B a held-out pass every 500 steps costs ~2 % of the time; else at every save",
    "train.checkpoint_layers": "auto lets the GPU memory probe choose; all is what the CPU and a plain config get",
    "validate.batch_size": "64 answers at a time on one GPU; 8 fits a CPU",
    "validate.max_new_tokens": "1024 on the real tasks, because 512 cuts MATH answers before their \\boxed{}",
    "validate.data": "the phases name their tasks' data (MATH-500, HumanEval)",
    "validate.gates": "the phases are gated; a plain config only reports",
}
DELIBERATE = {
    "1a": {**BOTH, "validate.reference": "phase 1A's expectation from the origin project"},
    "1b": {**BOTH, "base_model": "phase 1B trains on phase 1A's validated merge",
           "train.learning_rate": "a second phase on a tuned model takes half the first phase's rate",
           "validate.baseline": "phase 1B is compared with phase 1A's merge, not the original base"},
}


def flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and prefix == "":
            out.update(flat(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("phase", sorted(DELIBERATE))
def test_phase_yaml_differs_from_the_code_defaults_only_where_listed(phase):
    code = flat(dataclasses.asdict(PhaseConfig()))
    yaml = flat(dataclasses.asdict(load_config(phase_config_path(phase))))
    differs = {key for key in yaml if yaml[key] != code.get(key)}
    assert differs == set(DELIBERATE[phase]), (
        f"not listed: {sorted(differs - set(DELIBERATE[phase]))}; listed but equal now: "
        f"{sorted(set(DELIBERATE[phase]) - differs)}")
