"""Merge verification against measured noise floors, not a guessed tolerance.

Two rules, both measured on this merge:
- weights: every merged weight of a LoRA layer must be one rounding of W + scale * B @ A, computed here in float32
  through peft's own layer (get_delta_weight, independent of the merge's plan): within 1 ulp of the base dtype,
  plus the float32 summation's own error bound. Rounding cannot exceed it; a wrong scale, a transposed delta, a
  dropped module or a base that was 4-bit rounded on the way exceeds it by orders of magnitude.
- logits: structure the weight check cannot see (a tensor missing from the folder, a config that wires it
  differently). Base + adapter through peft and the merged model run in float32 on a few fixed prompts; the
  allowed max |difference| is NOISE_FACTOR x what running the same UNMERGED base + adapter in the base dtype does
  against float32 on those prompts: the difference every bf16 user of the adapter already accepts. A guessed rule
  (1 % x sqrt(layers) x the largest logit, ISSUES_LOG B29) failed a correct merge whose adapter moved the logits by
  their whole scale (B43): it could not tell rounding from corruption.
Top-1 agreement is checked beside them. The report and the log line say which rule decided, and by what margin.

Memory: the two models are never resident together. Base + adapter is loaded, run (float32, the weight check, then
the base dtype) and freed (its logits kept, a few MB) before the merged model loads, so the peak is one float32
model: 4 bytes a parameter, about 32 GB for an 8B, on the GPU when there is one (plus one weight tensor's working
set for the weight check). That is why `--no-verify` exists for machines that cannot hold it.
Weights are read with plain file reads through one small buffer per shard and widened on the device: an mmap'd
load (from_pretrained) kept a whole 5 GB shard resident in the process while it was copied to the GPU.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch

from cogumi.core.errors import UserError

log = logging.getLogger(__name__)

# Fixed, short, mixed math/code/chat prompts: the first `merge.verify_prompts` are used.
PROMPTS = [
    "What is 12 + 30? Answer with a number.",
    "Write a Python function that returns the square of x.",
    "Name the capital of France in one word.",
    "Explain what a prime number is in one sentence.",
    "Solve for x: 2x + 3 = 11.",
    "Complete the code: def fib(n):",
    "List three primary colors.",
    "Translate 'good morning' into Spanish.",
]
# The logit tolerance: this many times the base-dtype noise floor. The merged model (float32 compute, one rounding
# per changed weight) is noisier than nothing but quieter than the base-dtype run, which also rounds every
# activation, the LoRA path and the residual stream; a structural error moves logits by the adapter's effect.
NOISE_FACTOR = 2.0
# A float32 base has no lower-precision run to measure: its merge differs from peft by float32 summation order only.
FLOAT32_RELATIVE_FLOOR = 1e-5
WEIGHT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
PRECISION_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}  # significand bits, implicit one included
READ_CHUNK = 64 << 20  # bytes read and copied to the device at a time, per shard


def verify_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, *, prompts: int = 4,
                 max_abs_diff: float | None = None, min_top1: float = 0.99, dtype: str = "BF16") -> dict:
    """Check the merged weights and compare the two models' logits; returns the record for merge_report.json."""
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs = encode_prompts(merged_dir, prompts)
    loaded = time.perf_counter()
    ref = _run_reference(base_dir, adapter_dir, merged_dir, inputs, device, noise_dtype(dtype))
    between = time.perf_counter()
    merged = _run(lambda: load_model_float32(merged_dir, device), inputs, device)
    stages = {"tokenizer": loaded - started, "base_with_adapter": between - loaded,
              "merged": time.perf_counter() - between, "weight_check": ref["weights"]["seconds"]}
    scale = max(float(r.abs().max()) for r in ref["logits"])
    noise = max_diff(ref["logits"], ref["noisy"]) if ref["noisy"] else 0.0
    if max_abs_diff is not None:
        tolerance, source = max_abs_diff, "merge.max_abs_diff (fixed in the config)"
    else:
        tolerance, source = logit_tolerance(noise, scale)
    result = compare_logits(ref["logits"], merged, tolerance)
    effect = max_diff(ref["logits"], ref["plain"])
    result.update(prompts=len(inputs), device=str(device), compute_dtype="float32", max_abs_diff_allowed=tolerance,
                  tolerance_source=source, noise_dtype=str(ref["noise_dtype"]).replace("torch.", ""),
                  noise_floor_max_abs=noise, noise_factor=NOISE_FACTOR, min_top1_agreement=min_top1,
                  reference_logit_max=scale, adapter_effect_max_abs=effect, weights=ref["weights"],
                  seconds=round(time.perf_counter() - started, 3), skipped=False,
                  seconds_by_stage={k: round(v, 3) for k, v in stages.items()})  # each model: load + forward
    result.update(decide(result))
    if effect <= tolerance:
        result["warning"] = ("the adapter changes the logits by less than the tolerance: the logit rule cannot see "
                             "it, the weight rule decides")
        log.warning("verify: %s (effect %.3g, tolerance %.3g)", result["warning"], effect, tolerance)
    log.info("verify: %s", result["summary"])
    return result


def decide(result: dict) -> dict:
    """Each rule's verdict and margin; the merge passes when no deciding rule failed. `decided_by`: the rule that
    failed (what to look at), or the rules that passed; `margin`: the smallest allowed/measured ratio among them."""
    weights, effect, allowed = result["weights"], result["adapter_effect_max_abs"], result["max_abs_diff_allowed"]
    off = f"; {weights['failed_count']} tensors off, e.g. {weights['failed_tensors'][:2]}" if (
        weights["failed_count"]) else ""
    gone = f"; missing from the folder: {weights['missing_tensors'][:2]}" if weights["missing_tensors"] else ""
    rules = {
        "weights": {"passed": weights["passed"], "decides": True,
                    "measured": weights["max_error_allowed_fraction"], "allowed": 1.0,
                    "says": f"{weights['tensors']} LoRA-layer weights against one rounding of W + scale*B@A: worst "
                            f"{weights['max_error_ulps']:.3g} ulp, {weights['max_error_allowed_fraction']:.3g} of "
                            f"the allowed (1 ulp + float32 summation bound) in {weights['worst_tensor']}{off}{gone}"},
        # blind when the adapter itself moves logits by no more than the tolerance: the base dtype's own noise is
        # then as large as the adapter, and the difference says nothing either way (the weight rule still decides)
        "logits": {"passed": result["max_abs_diff"] <= allowed, "decides": effect > allowed,
                   "measured": result["max_abs_diff"], "allowed": allowed,
                   "says": f"max |logit diff| {result['max_abs_diff']:.3g} (allowed {allowed:.3g} = "
                           f"{result['tolerance_source']}; the adapter itself moves logits by {effect:.3g})"},
        "top1": {"passed": result["top1_agreement"] >= result["min_top1_agreement"], "decides": True,
                 "measured": result["top1_agreement"], "allowed": result["min_top1_agreement"],
                 "says": f"top-1 agreement {result['top1_agreement']:.4f} (min {result['min_top1_agreement']:.2f}) "
                         f"on {result['decisive_positions']} decisive positions of {result['prompts']} prompts"},
    }
    for name, rule in rules.items():
        measured = rule["measured"]
        # top-1 is a fraction: its margin is how far above the minimum; the others allowed / measured
        # (a tiny floor, not infinity, for an exact match: the report stays plain JSON)
        rule["margin"] = measured - rule["allowed"] if name == "top1" else rule["allowed"] / max(measured, 1e-30)
    failed = [name for name, rule in rules.items() if rule["decides"] and not rule["passed"]]
    deciding = [name for name, rule in rules.items() if rule["decides"]]
    ratios = {n: rules[n]["margin"] for n in deciding if n != "top1"}
    closest = min(ratios, key=ratios.get)
    if failed:
        verdict = f"FAILED by the {failed[0]} rule"
    else:
        verdict = f"passed by {', '.join(deciding)}; closest: {closest}, allowed/measured {ratios[closest]:.3g}x"
    states = {n: "ok" if r["passed"] else "FAILED" if r["decides"] else "over, but blind here"
              for n, r in rules.items()}
    summary = "; ".join(f"{n}: {r['says']}: {states[n]}" for n, r in rules.items())
    return {"passed": not failed, "rules": rules, "decided_by": failed[0] if failed else "+".join(deciding),
            "margin": ratios[closest], "summary": f"{summary}. {verdict}"}


def noise_dtype(dtype: str) -> torch.dtype:
    """The dtype a user runs this base in: a mixed-dtype base is held to its lowest precision."""
    kinds = set(dtype.split(","))
    return next((WEIGHT_DTYPES[k] for k in ("BF16", "F16") if k in kinds), torch.float32)


def logit_tolerance(noise: float, logit_scale: float) -> tuple[float, str]:
    floor = FLOAT32_RELATIVE_FLOOR * logit_scale
    if NOISE_FACTOR * noise >= floor:
        return NOISE_FACTOR * noise, f"{NOISE_FACTOR:g} x the base-dtype noise floor {noise:.3g}"
    return max(floor, 1e-6), f"float32 floor {FLOAT32_RELATIVE_FLOOR:g} x the largest logit"


def max_diff(left: list[torch.Tensor], right: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(left, right, strict=True))


def encode_prompts(model_dir: Path, count: int) -> list[torch.Tensor]:
    """Token ids of the first `count` prompts, through the chat template when the tokenizer has one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = []
    for text in PROMPTS[: max(1, count)]:
        # Render to text, then tokenize: what apply_chat_template returns when it tokenizes has changed across
        # transformers versions (a list of ids, then an Encoding or a dict), its rendered text has not.
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already has the BOS
        else:
            ids = tokenizer(text)["input_ids"]
        encoded.append(torch.tensor([list(ids)], dtype=torch.long))
    return encoded


def _run(load, inputs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Logits of each prompt (float32, on the CPU); the model is freed before the next one loads."""
    model = load()
    logits = _logits(model, inputs, device)
    del model  # freed before the other model loads: one model resident at a time
    _free(device)
    return logits


def _run_reference(base_dir: Path, adapter_dir: Path, merged_dir: Path, inputs: list[torch.Tensor],
                   device: torch.device, run_dtype: torch.dtype) -> dict:
    """Base + adapter through peft: its float32 logits, the same with the adapter disabled, the weight check, and
    then (the model converted in place) its logits in the base dtype: the noise floor."""
    model = _load_with_adapter(base_dir, adapter_dir, device)
    out = {"logits": _logits(model, inputs, device), "noise_dtype": run_dtype, "noisy": []}
    with model.disable_adapter():
        out["plain"] = _logits(model, inputs, device)
    out["weights"] = check_weights(model, merged_dir, device)
    if run_dtype != torch.float32:
        # the base weights convert exactly (they are stored in this dtype); the LoRA path rounds, as for any user
        out["noisy"] = _logits(model.to(run_dtype), inputs, device)
    del model
    _free(device)
    return out


def _logits(model, inputs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=ids.to(device)).logits[0].float().cpu() for ids in inputs]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_weights(peft_model, merged_dir: Path, device: torch.device) -> dict:
    """Every LoRA layer's merged weight against W + delta from peft's own layer, one tensor at a time.

    Allowed per element: 1 ulp of the stored dtype at the expected value (one rounding is at most half of it; a
    different float32 summation order can move a value that sits near a rounding boundary across it), plus twice
    the float32 error bound of W + sum over the rank of |B||A| (the merge's sum and this one's)."""
    from peft.tuners.lora import LoraLayer

    from cogumi.merge.inputs import scan_base
    from cogumi.merge.write import read_tensor

    started = time.perf_counter()
    located = {name: shard for shard in scan_base(merged_dir) for name in shard.entries}
    handles: dict[Path, object] = {}
    worst = {"fraction": 0.0, "ulps": 0.0, "tensor": None}
    tensors, missing, failed = 0, [], []
    try:
        for module_name, layer in peft_model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            key = module_name.removeprefix("base_model.model.") + ".weight"
            shard = located.get(key)
            if shard is None:
                missing.append(key)
                continue
            src = handles.get(shard.path) or handles.setdefault(shard.path, open(shard.path, "rb"))
            stored = read_tensor(src, shard, key)
            fraction, ulps = _weight_error(layer, stored.to(device=device), device)
            tensors += 1
            if fraction > worst["fraction"] or worst["tensor"] is None:
                worst = {"fraction": fraction, "ulps": ulps, "tensor": key}
            if fraction > 1.0:
                failed.append(key)
    finally:
        for fh in handles.values():
            fh.close()
    passed = not missing and not failed and tensors > 0
    return {"passed": passed, "tensors": tensors, "max_error_allowed_fraction": worst["fraction"],
            "max_error_ulps": worst["ulps"], "worst_tensor": worst["tensor"], "failed_tensors": failed[:10],
            "failed_count": len(failed), "missing_tensors": missing[:10],
            "seconds": round(time.perf_counter() - started, 3)}


def _weight_error(layer, stored: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(max of |merged - expected| / allowed, max of |merged - expected| in ulps of the stored dtype)."""
    adapters = [a for a in layer.active_adapters if a in layer.scaling]
    with torch.no_grad():
        base = layer.get_base_layer().weight.detach().to(device=device, dtype=torch.float32)
        expected = base.clone()
        for name in adapters:
            expected += layer.get_delta_weight(name).float()
        bound = base.abs() + _abs_delta(layer, adapters)
        rank = sum(int(layer.r[a]) for a in adapters)
        error = (stored.float() - expected).abs()
        ulp = ulp_of(expected, stored.dtype)
        allowed = ulp + 2 * (rank + 2) * torch.finfo(torch.float32).eps * bound
        error = torch.nan_to_num(error, nan=float("inf"))
        return float((error / allowed).max()), float((error / ulp).max())


def _abs_delta(layer, adapters: list[str]) -> torch.Tensor:
    """scale * |B| @ |A| (in the layer's own layout): peft's get_delta_weight on the absolute values, restored after."""
    params = [p for n, p in layer.named_parameters() if "lora_" in n and any(f".{a}" in f".{n}" for a in adapters)]
    saved = [p.detach().clone() for p in params]
    try:
        for p in params:
            p.data.abs_()
        return sum(layer.get_delta_weight(a).float().abs() for a in adapters)
    finally:
        for p, value in zip(params, saved, strict=True):
            p.data.copy_(value)


def ulp_of(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at each value (float32): 2**(e - p) for |x| in [2**(e-1), 2**e), p significand bits."""
    dtype = dtype if dtype in PRECISION_BITS else torch.float32  # a float64 base is checked at float32's precision
    bits = PRECISION_BITS[dtype]
    _, exponent = torch.frexp(values)
    spacing = torch.ldexp(torch.ones_like(values), exponent - bits)
    smallest = torch.finfo(dtype).smallest_normal * 2.0 ** (1 - bits)  # the subnormal spacing (and at zero)
    return torch.where(values == 0, smallest, spacing.clamp_min(smallest))


def load_model_float32(model_dir: Path, device: torch.device):
    """The model in float32 on `device`: built without weights, then filled from the safetensors files."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) real, on the CPU
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    expected = set(model.state_dict())
    state = read_weights(model_dir, device, keep=expected)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # a tied LM head is stored once, as the embedding
    missing = sorted(name for name, param in model.named_parameters() if param.is_meta)
    if missing:
        raise UserError(f"{len(missing)} weights of the model are not in its safetensors files, e.g. {missing[0]}",
                        where=str(model_dir), fix="the folder is incomplete: re-create it (merge again, FORCE=1)")
    return model.to(device).eval()


def read_weights(model_dir: Path, device: torch.device, keep: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor named in `keep`, in float32 on `device`, read shard by shard in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    from cogumi.merge.inputs import scan_base

    shards = scan_base(model_dir)
    state: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(max(1, min(4, len(shards))), "verify-read") as pool:
        for part in pool.map(lambda shard: _read_shard(shard, device, keep), shards):
            state.update(part)
    return state


def _read_shard(shard, device: torch.device, keep: set[str]) -> dict[str, torch.Tensor]:
    from cogumi.merge.write import DTYPES

    on_gpu = device.type == "cuda"
    staging = torch.empty(READ_CHUNK, dtype=torch.uint8, pin_memory=on_gpu)
    # bytes go to the GPU as they are and are widened there (a cross-device copy_ that also changes the dtype
    # would convert on the CPU first)
    landing = torch.empty(READ_CHUNK, dtype=torch.uint8, device=device) if on_gpu else staging
    out = {}
    with open(shard.path, "rb", buffering=0) as fh:
        for name, info in shard.entries.items():
            if name not in keep:
                continue
            dtype = DTYPES[info["dtype"]]
            tensor = torch.empty(info["shape"], dtype=torch.float32, device=device)
            flat, size = tensor.view(-1), dtype.itemsize
            start, stop = info["data_offsets"]
            fh.seek(shard.data_start + start)
            done, step = 0, READ_CHUNK // size
            while done < flat.numel():
                count = min(step, flat.numel() - done)
                view = staging[: count * size]
                if fh.readinto(memoryview(view.numpy())) != count * size:
                    raise OSError(f"{shard.path} ended early")
                landed = landing[: count * size]
                if on_gpu:
                    landed.copy_(view)
                flat[done: done + count].copy_(landed.view(dtype))
                done += count
            out[name] = tensor
    return out


def _load_with_adapter(base_dir: Path, adapter_dir: Path, device: torch.device):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model_float32(base_dir, device), adapter_dir).to(device).eval()


def compare_logits(reference: list[torch.Tensor], merged: list[torch.Tensor], tolerance: float) -> dict:
    """Max/mean |difference| and top-1 agreement. Top-1 is judged where the reference's choice is decisive
    (its top-2 margin above 2 x tolerance): a near-tie may flip under any in-tolerance change, which says
    nothing about the merge (random-weight test models are almost all near-ties)."""
    pairs = list(zip(reference, merged, strict=True))
    diffs = [(r - m).abs() for r, m in pairs]
    agree = torch.cat([r.argmax(-1) == m.argmax(-1) for r, m in pairs])
    margins = torch.cat([r.topk(2, dim=-1).values.diff(dim=-1).abs().squeeze(-1) for r, _ in pairs])
    decisive = margins > 2 * tolerance
    return {"max_abs_diff": float(max(d.max() for d in diffs)),
            "mean_abs_diff": float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs)),
            "top1_agreement": float(agree[decisive].float().mean()) if decisive.any() else 1.0,
            "top1_agreement_all": float(agree.float().mean()), "positions": int(agree.numel()),
            "decisive_positions": int(decisive.sum())}
