"""The streaming merge: exact against peft, single rounding, every refusal before any output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merge_helpers import assert_nothing_written, job, make_adapter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogumi.core import fsutil
from cogumi.core.errors import EXIT_FAILED, UserError
from cogumi.core.manifest import read_manifest, sha256_file, weights_fingerprint
from cogumi.core.paths import SCRIPTS_DIR
from cogumi.core.safetensors_io import read_header, tensor_entries, weight_files
from cogumi.demo.tiny import save_tiny_model
from cogumi.merge import plan
from cogumi.merge.stream import run_merge

# ---------------------------------------------------------------- helpers


def peft_merged_state(base_dir: Path, adapter_dir: Path, dtype=torch.float32) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=dtype)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


def read_weights(model_dir: Path) -> dict:
    out = {}
    for path in weight_files(model_dir):
        out.update(load_file(path))
    return out


def raw_bytes(model_dir: Path) -> dict:
    """tensor name -> its exact bytes on disk."""
    out = {}
    for path in weight_files(model_dir):
        header = read_header(path)
        data = path.read_bytes()
        start = len(data) - max(i["data_offsets"][1] for i in tensor_entries(header).values())
        for name, info in tensor_entries(header).items():
            out[name] = data[start + info["data_offsets"][0]: start + info["data_offsets"][1]]
    return out


@pytest.fixture(scope="module")
def fp32_sharded(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("fp32") / "base", max_shard_size="40KB")


@pytest.fixture(scope="module")
def fp32_adapter(fp32_sharded, tmp_path_factory) -> Path:
    return make_adapter(fp32_sharded, tmp_path_factory.mktemp("adapter") / "adapter")


# ---------------------------------------------------------------- exactness


@pytest.mark.slow
def test_fp32_merge_equals_peft_and_leaves_the_rest_byte_identical(fp32_sharded, fp32_adapter, tmp_path):
    out = tmp_path / "merged"
    report = run_merge(job(fp32_sharded, fp32_adapter, out))
    assert report["passed"] and report["verification"]["skipped"] and report["shards"] >= 3
    merged, expected = read_weights(out), peft_merged_state(fp32_sharded, fp32_adapter)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-5, msg=name)
    updated = {n for n in merged if n.endswith("_proj.weight")}
    assert len(updated) == report["tensors_updated"] == 2 * 7
    base_raw, out_raw = raw_bytes(fp32_sharded), raw_bytes(out)
    assert all(base_raw[n] == out_raw[n] for n in base_raw if n not in updated)
    assert all(base_raw[n] != out_raw[n] for n in updated)
    # same shard layout, index and side files; the manifest names base, adapter and dtype
    assert [p.name for p in weight_files(out)] == [p.name for p in weight_files(fp32_sharded)]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (fp32_sharded / name).read_bytes()
    manifest = read_manifest(out)
    assert manifest["kind"] == "merged" and manifest["dtype"] == "F32" and manifest["verified"] == "skipped"
    assert manifest["base_fingerprint"] == weights_fingerprint(fp32_sharded)
    assert manifest["weights_sha256"] == {p.name: sha256_file(p) for p in [*weight_files(out),
                                                                           out / "model.safetensors.index.json"]}
    assert json.loads((out / "merge_report.json").read_text())["verification"]["skipped"] is True


@pytest.mark.slow
def test_background_writeback_writes_the_same_bytes(fp32_sharded, fp32_adapter, tmp_path, monkeypatch):
    # every few KiB an fdatasync runs on its own thread while the writer goes on: the files must not change
    from cogumi.merge import write

    plain = run_merge(job(fp32_sharded, fp32_adapter, tmp_path / "plain"))
    monkeypatch.setattr(write, "FLUSH_EVERY", 4096)
    flushed = run_merge(job(fp32_sharded, fp32_adapter, tmp_path / "flushed"))
    assert plain["passed"] and flushed["passed"]
    assert raw_bytes(tmp_path / "plain") == raw_bytes(tmp_path / "flushed")
    assert read_manifest(tmp_path / "plain")["weights_sha256"] == read_manifest(tmp_path / "flushed")["weights_sha256"]


def test_bf16_result_is_one_rounding_of_the_fp32_sum(tiny_sharded_bf16_dir, tmp_path):
    adapter = make_adapter(tiny_sharded_bf16_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    run_merge(job(tiny_sharded_bf16_dir, adapter, out))
    base, merged, lora = read_weights(tiny_sharded_bf16_dir), read_weights(out), load_file(
        adapter / "adapter_model.safetensors")
    double_rounding_differs = 0
    for name in (n for n in base if n.endswith("_proj.weight")):
        module = "base_model.model." + name[: -len(".weight")]
        a, b = lora[f"{module}.lora_A.weight"].float(), lora[f"{module}.lora_B.weight"].float()
        delta = b @ (a * (8 / 4))  # the merge scales A, the small factor
        single = (base[name].float() + delta).to(torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], single), name
        double = (base[name].float() + delta.to(torch.bfloat16).float()).to(torch.bfloat16)
        double_rounding_differs += int((double != single).sum())
    assert double_rounding_differs > 0  # the check above can tell one rounding from two


@pytest.mark.slow
def test_rslora_rank_alpha_patterns_and_embedding_lora_equal_peft(fp32_sharded, tmp_path):
    adapter = make_adapter(fp32_sharded, tmp_path / "adapter", use_rslora=True,
                           target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                           rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"q_proj": 3})
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_rslora"] and config["rank_pattern"]
    out = tmp_path / "merged"
    run_merge(job(fp32_sharded, adapter, out))
    merged, expected = read_weights(out), peft_merged_state(fp32_sharded, adapter)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert not torch.equal(merged["model.embed_tokens.weight"], read_weights(fp32_sharded)["model.embed_tokens.weight"])


@pytest.mark.slow
def test_fan_in_fan_out_conv1d_equals_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(
        base, max_shard_size="30KB", safe_serialization=True)
    model = GPT2LMHeadModel.from_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter", model=model, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_fc", "c_proj"])
    out = tmp_path / "merged"
    run_merge(job(base, adapter, out))
    merged, expected = read_weights(out), peft_merged_state(base, adapter)
    assert len(weight_files(out)) >= 2
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------- refusals: nothing under the final name


def _quantized_base(base: Path, tmp: Path) -> Path:
    copy = shutil.copytree(base, tmp / "base-q")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _truncated_case(base: Path, adapter: Path, tmp: Path) -> tuple[Path, Path]:
    """A base whose second shard lost its last bytes, with an adapter whose lineage matches it."""
    copy = shutil.copytree(base, tmp / "base-t")
    shard = weight_files(copy)[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return copy, _edited_adapter(adapter, tmp, config={"base_model_name_or_path": str(copy)},
                                 manifest={"base_fingerprint": weights_fingerprint(copy)})


def _renamed_key_adapter(adapter: Path, tmp: Path) -> Path:
    copy = shutil.copytree(adapter, tmp / "adapter-k")
    tensors = load_file(copy / "adapter_model.safetensors")
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key.replace("q_proj", "qq_proj")] = tensors.pop(key)
    tensors[key.replace("q_proj", "qq_proj").replace("lora_A", "lora_B")] = tensors.pop(
        key.replace("lora_A", "lora_B"))
    save_file(tensors, copy / "adapter_model.safetensors")
    manifest = json.loads((copy / "manifest.json").read_text())  # a consistent adapter: only the key is wrong
    manifest["adapter_hash"] = sha256_file(copy / "adapter_model.safetensors")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _flipped_bytes_adapter(adapter: Path, tmp: Path) -> Path:
    """Same size, a few bytes changed in the middle of a tensor: only the hash can tell."""
    copy = shutil.copytree(adapter, tmp / "adapter-f")
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) - 4096
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    weights.write_bytes(bytes(data))
    return copy


def _edited_adapter(adapter: Path, tmp: Path, *, config=None, manifest=None) -> Path:
    copy = shutil.copytree(adapter, tmp / "adapter-e")
    for name, changes in (("adapter_config.json", config), ("manifest.json", manifest)):
        data = json.loads((copy / name).read_text())
        (copy / name).write_text(json.dumps({**data, **(changes or {})}))
    return copy


REFUSALS = {
    "lineage-name": (lambda b, a, t: (b, _edited_adapter(a, t, config={"base_model_name_or_path": "org/other"})),
                     "lineage mismatch: the adapter was trained on 'org/other'"),
    "lineage-weights": (lambda b, a, t: (b, _edited_adapter(a, t, manifest={"base_fingerprint": "0" * 64})),
                        "records base weights 0000000000000000"),
    "quantized-base": (lambda b, a, t: (_quantized_base(b, t), a), "quantization_config"),
    "adapter-on-4bit-manifest": (lambda b, a, t: (b, _edited_adapter(a, t, manifest={"trained_on_quantized": True})),
                                 "trained on a quantized base"),
    "adapter-on-4bit-name": (lambda b, a, t: (b, _edited_adapter(a, t, config={
        "base_model_name_or_path": "unsloth/meta-llama-3.1-8b-instruct-unsloth-bnb-4bit"})), "4-bit"),
    "truncated-shard": (_truncated_case, "truncated"),
    "missing-adapter-file": (lambda b, a, t: (b, _without(a, t, "adapter_model.safetensors")),
                             "no adapter_model.safetensors"),
    "missing-manifest": (lambda b, a, t: (b, _without(a, t, "manifest.json")), "no manifest.json"),
    "key-matches-nothing": (lambda b, a, t: (b, _renamed_key_adapter(a, t)), "which the base does not have"),
    "flipped-adapter-bytes": (lambda b, a, t: (b, _flipped_bytes_adapter(a, t)), "changed since training"),
    "no-adapter-hash": (lambda b, a, t: (b, _edited_adapter(a, t, manifest={"adapter_hash": None})),
                        "records no adapter_hash"),
}


def _without(adapter: Path, tmp: Path, name: str) -> Path:
    copy = shutil.copytree(adapter, tmp / "adapter-m")
    (copy / name).unlink()
    return copy


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_clear_and_write_nothing(case, fp32_sharded, fp32_adapter, tmp_path):
    make, expected = REFUSALS[case]
    base, adapter = make(fp32_sharded, fp32_adapter, tmp_path)
    out = tmp_path / "merged"
    with pytest.raises(UserError) as err:
        run_merge(job(base, adapter, out))
    assert expected in err.value.render(), err.value.render()
    if "lineage" in case:
        assert str(base) in err.value.what  # both sides are named
    if "4bit" in case or "quantized" in case:
        assert "ISSUES_LOG.md" in err.value.what
    assert_nothing_written(out)


def test_disk_preflight_refuses_before_writing(fp32_sharded, fp32_adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 1000)
    out = tmp_path / "merged"
    with pytest.raises(UserError, match="not enough disk"):
        run_merge(job(fp32_sharded, fp32_adapter, out))
    assert_nothing_written(out)


def test_existing_output_refused_without_force_and_moved_aside_with_it(fp32_sharded, fp32_adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists") as err:
        run_merge(job(fp32_sharded, fp32_adapter, out))
    assert "FORCE=1" in err.value.fix and (out / "precious.txt").exists()
    run_merge(job(fp32_sharded, fp32_adapter, out, force=True))
    aside = list(tmp_path.glob("merged.old-*"))
    assert len(aside) == 1 and (aside[0] / "precious.txt").read_text() == "mine"
    assert (out / "merge_report.json").exists()


# ---------------------------------------------------------------- verification


@pytest.mark.slow
def test_entry_script_verifies_and_reports(tiny_sharded_bf16_dir, tmp_path, run_script):
    make_adapter(tiny_sharded_bf16_dir, tmp_path / "demo" / "adapter")
    config = tmp_path / "demo.yaml"
    config.write_text(f"name: demo\nbase_model: {tiny_sharded_bf16_dir}\noutput_root: {tmp_path}\n"
                      "merge:\n  verify_prompts: 2\ndisk:\n  margin_mb: 1\n")
    result = run_script("merge_adapter_fullprecision.py", "--phase", str(config))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "demo_merged" / "merge_report.json").read_text())
    check = report["verification"]
    assert check["passed"] and check["prompts"] == 2 and check["max_abs_diff"] <= check["max_abs_diff_allowed"]
    assert 0 < check["max_abs_diff"] < check["adapter_effect_max_abs"] and check["top1_agreement"] == 1.0
    # the log says which rule decided and by what margin (B43)
    assert "verification passed by weights" in result.stderr and "closest margin" in result.stderr, result.stderr
    assert "weights:" in result.stderr and "ulp" in result.stderr and "noise floor" in result.stderr
    assert report["peak_rss_mb"] > 0 and report["wall_seconds"] > 0 and report["shards"] >= 3
    assert read_manifest(tmp_path / "demo_merged")["verified"] is True
    again = run_script("merge_adapter_fullprecision.py", "--phase", str(config), "--no-verify")
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    forced = run_script("merge_adapter_fullprecision.py", "--phase", str(config), "--no-verify", env={"FORCE": "1"})
    assert forced.returncode == 0, forced.stderr
    report = json.loads((tmp_path / "demo_merged" / "merge_report.json").read_text())
    assert report["verification"]["skipped"] is True and "not" in report["verification"]["reason"]


@pytest.mark.slow
def test_failed_verification_exits_non_zero_and_keeps_output_aside(tiny_sharded_bf16_dir, tmp_path, monkeypatch):
    import merge_adapter_fullprecision as entry

    make_adapter(tiny_sharded_bf16_dir, tmp_path / "demo" / "adapter")
    config = tmp_path / "demo.yaml"
    config.write_text(f"name: demo\nbase_model: {tiny_sharded_bf16_dir}\noutput_root: {tmp_path}\n"
                      "merge:\n  verify_prompts: 2\ndisk:\n  margin_mb: 1\n")
    right_scale = plan.lora_scale
    monkeypatch.setattr(plan, "lora_scale", lambda *args: 1.5 * right_scale(*args))  # a plausible-looking bug
    assert entry.main(["--phase", str(config)]) == EXIT_FAILED
    assert not (tmp_path / "demo_merged").exists()
    failed = list(tmp_path.glob("demo_merged.failed-*"))
    assert len(failed) == 1
    check = json.loads((failed[0] / "merge_report.json").read_text())["verification"]
    assert not check["passed"] and check["max_abs_diff"] > check["max_abs_diff_allowed"]
    assert check["decided_by"] == "weights" and check["weights"]["failed_count"] == 14  # every module's scale
    assert read_manifest(failed[0])["verified"] is False


# ---------------------------------------------------------------- memory

MEMORY_CHILD = """
import json, sys
from pathlib import Path
from cogumi.merge.stream import MergeJob, run_merge, peak_rss_mb

def job(base, adapter, out):
    return MergeJob(base_model=base, adapter_dir=Path(adapter), out_dir=Path(out), verify=False, margin_bytes=0)

def rss_mb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))

small, small_adapter, big, big_adapter, out = sys.argv[1:]
run_merge(job(small, small_adapter, out + "-warmup"))  # code paths, allocator and thread pools warmed up
try:
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
except OSError:
    pass  # then the peak still holds import and warm-up: the growth below is overstated, never understated
before = rss_mb()
run_merge(job(big, big_adapter, out))
print(json.dumps({"rss_before_mb": before, "peak_mb": peak_rss_mb()}))
"""


@pytest.mark.slow
def test_peak_memory_grows_by_less_than_two_shards(tiny_sharded_bf16_dir, tmp_path):
    """Measured in a fresh process: its peak RSS (VmHWM, reset after a warm-up merge) over its RSS just before
    the merge. RSS is per process, so a busy machine changes the timing but not this number; ru_maxrss would
    not do, since a vfork+exec child inherits pytest's own peak there."""
    import bench_merge

    base = bench_merge.build_random_llama(tmp_path / "base", "test")
    adapter = bench_merge.build_random_adapter(base, tmp_path / "adapter")
    small_adapter = make_adapter(tiny_sharded_bf16_dir, tmp_path / "small-adapter")
    shards = [p.stat().st_size for p in weight_files(base)]
    assert len(shards) >= 3 and sum(shards) > 2 * max(shards)  # loading the whole model would fail the bound
    result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tiny_sharded_bf16_dir), str(small_adapter),
                             str(base), str(adapter), str(tmp_path / "merged")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(SCRIPTS_DIR)}, timeout=600)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    growth = (numbers["peak_mb"] - numbers["rss_before_mb"]) * 2**20
    assert growth < 2 * max(shards), f"peak RSS grew {growth / 1e6:.1f} MB; two shards are {2 * max(shards) / 1e6} MB"
    with safe_open(weight_files(tmp_path / "merged")[0], framework="pt") as fh:
        assert len(list(fh.keys())) > 0
