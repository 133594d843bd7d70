"""The shared tiny-model fixtures are real model folders that transformers loads and runs."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cogumi.core.guards import quantization_reasons
from cogumi.core.safetensors_io import read_header, tensor_entries, weight_files


def test_tiny_model_loads_and_chat_template_formats(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")
    # Llama's forward rejects token_type_ids: the fixture tokenizer must not produce them.
    assert set(enc.keys()) == {"input_ids", "attention_mask"}
    text = tokenizer.decode(enc["input_ids"][0])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert text.count("<|eot_id|>") == 2
    logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_sharded_fixture_is_bf16_in_several_safetensors(tiny_sharded_bf16_dir):
    files = weight_files(tiny_sharded_bf16_dir)
    assert len(files) >= 3
    index = json.loads((tiny_sharded_bf16_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    dtypes = {info["dtype"] for f in files for info in tensor_entries(read_header(f)).values()}
    assert dtypes == {"BF16"}
    assert quantization_reasons(tiny_sharded_bf16_dir) == []
    model = AutoModelForCausalLM.from_pretrained(tiny_sharded_bf16_dir, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
