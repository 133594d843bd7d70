"""The card's own ceiling, measured in the same call as the variants: bf16 matmul rate and copy bandwidth."""

from __future__ import annotations

import datetime as dt

from cogumi.perf.models import device_info, versions


def run_ceiling(spec: dict) -> dict:
    """Measured bf16 matmul rate (random data, median of timed runs) at 8192^3 and at the model's own shapes."""
    import torch

    device = torch.device(spec["device"])
    if device.type != "cuda":
        return {"variant": "ceiling", "device": "cpu"}
    torch.manual_seed(0)
    shapes = [(8192, 8192, 8192), (2048, 4096, 14336), (2048, 14336, 4096), (2048, 4096, 4096),
              (2048, 4096, 1024), (8192, 4096, 14336), (512, 4096, 128256), (64, 4096, 128256)]
    out = {}
    for m, k, n in shapes:
        sets = [(torch.randn(m, k, device=device, dtype=torch.bfloat16),
                 torch.randn(k, n, device=device, dtype=torch.bfloat16)) for _ in range(3)]
        for a, b in sets:
            a @ b
        torch.cuda.synchronize()
        ts = []
        for i in range(30):
            a, b = sets[i % 3]
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            ts.append((s, e))
        torch.cuda.synchronize()
        ms = sorted(s.elapsed_time(e) for s, e in ts)[len(ts) // 2]
        out[f"{m}x{k}x{n}"] = round(2 * m * k * n / (ms / 1000) / 1e12, 1)
        del sets
    x = torch.empty(2**30 // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    copy_tbs = 10 * 2 * x.numel() * 2 / (s.elapsed_time(e) / 1000) / 1e12
    return {"variant": "ceiling", "matmul_tflops": out, "copy_tb_s": round(copy_tbs, 2), **device_info(device),
            "versions": versions(), "date": dt.date.today().isoformat()}
