"""make quantize: the quantized output is for deployment only; training and merging refuse it as a base."""

import json
import shutil

import pytest
from transformers import BitsAndBytesConfig

from cogumi.core.errors import UserError
from cogumi.core.guards import refuse_quantized_base
from cogumi.merge.quantize import bnb_config, quantized_dir


def quantized_output_like(tmp_path, tiny_sharded_bf16_dir, quant: str):
    """A folder laid out as `make quantize` names it, with the quantization_config transformers writes."""
    merged = tmp_path / "phase1a_merged"
    shutil.copytree(tiny_sharded_bf16_dir, merged)
    out = shutil.copytree(merged, quantized_dir(merged, quant))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = bnb_config(quant).to_dict()
    (out / "config.json").write_text(json.dumps(config))
    return merged, out


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_output_is_refused_as_a_base(tmp_path, tiny_sharded_bf16_dir, quant):
    merged, out = quantized_output_like(tmp_path, tiny_sharded_bf16_dir, quant)
    assert out.name == f"phase1a_merged-{quant}"
    assert isinstance(bnb_config(quant), BitsAndBytesConfig)
    refuse_quantized_base(merged)  # the bf16 merge itself is a fine base
    with pytest.raises(UserError) as err:
        refuse_quantized_base(out)
    assert "quantization_config (quant_method=bitsandbytes)" in err.value.what
    assert quant in err.value.what  # the name alone would also have tripped it


def adapter_for(base, adapter_dir):
    """A real peft adapter with its manifest, as `make train` leaves it, claiming `base` as its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cogumi.core.manifest import write_manifest

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(adapter_dir)
    write_manifest(adapter_dir, "adapter", base_model=str(base), trained_on_quantized=False)


@pytest.mark.slow
def test_train_and_merge_entry_scripts_refuse_the_quantized_output(tmp_path, tiny_sharded_bf16_dir, run_script):
    merged, out = quantized_output_like(tmp_path, tiny_sharded_bf16_dir, "nf4")
    adapter_for(merged, tmp_path / "phaseq" / "adapter")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "response": "2"}) + "\n")
    config = tmp_path / "phaseq.yaml"
    config.write_text(f"name: phaseq\nbase_model: {out}\noutput_root: {tmp_path}\ndata:\n  train_path: {data}\n")
    for script in ("train_phase1a_fullprecision.py", "merge_adapter_fullprecision.py"):
        result = run_script(script, "--phase", str(config))
        assert result.returncode == 2, (script, result.stdout, result.stderr)
        assert "is quantized" in result.stderr and "Traceback" not in result.stderr, (script, result.stderr)
    assert not any((tmp_path / "phaseq").glob("checkpoint-*"))
    assert not (tmp_path / "phaseq_merged").exists()


@pytest.mark.slow
def test_quantize_without_a_gpu_says_so_in_one_line_and_fails(tmp_path, run_script):
    config = tmp_path / "phaseq.yaml"
    config.write_text(f"name: phaseq\noutput_root: {tmp_path}\n")
    result = run_script("quantize.py", "--phase", str(config), "--quant", "int8")
    assert result.returncode == 2
    one_line = "quantize needs an NVIDIA GPU (bitsandbytes quantizes on CUDA); none is visible here."
    assert result.stdout.strip() == one_line
