"""make check: the stack self-check. Installed versions equal the lock, numpy < 2, torch/CUDA/GPU/bf16,
flash-attn (import and one tiny attention call on a GPU), free disk where checkpoints and the hub cache live.

Exit 0 when everything a training run needs is right; otherwise one screen saying what is wrong and what to do.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

from cogumi.core.paths import REPO_ROOT

DEFAULT_LOCKS = ["requirements/base.txt", "requirements/dev.txt", "requirements/eval.txt", "requirements/tracking.txt"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
GIB = 1024**3


def read_lock(path: Path) -> dict[str, str]:
    """name -> version for every `name==version` line of a uv-compiled lock."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_versions(locks: list[Path]) -> list[str]:
    problems = []
    for lock in locks:
        for name, wanted in read_lock(lock).items():
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                problems.append(f"{name}=={wanted} (from {lock.name}) is not installed")
                continue
            if have.split("+")[0] != wanted.split("+")[0]:
                problems.append(f"{name} is {have}, the lock {lock.name} says {wanted}")
    return problems


def check_torch(report: list[str]) -> list[str]:
    import numpy
    import torch

    problems = []
    if int(numpy.__version__.split(".")[0]) >= 2:
        problems.append(f"numpy {numpy.__version__} is 2.x; the stack needs numpy<2 (1.26.4)")
    report.append(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), numpy {numpy.__version__}")
    if not torch.cuda.is_available():
        report.append("GPU: none (CPU only: fine for make demo/test; training the 8B phases needs a GPU)")
        report.append("attention: sdpa")
        return problems
    name = torch.cuda.get_device_name(0)
    bf16 = torch.cuda.is_bf16_supported()
    report.append(f"GPU: {torch.cuda.device_count()} x {name}, bf16 {'yes' if bf16 else 'NO'}")
    if not bf16:
        problems.append(f"{name} has no bf16: full-precision LoRA on this stack expects an Ampere-or-newer GPU")
    report.append("attention: " + check_flash_attn(problems))
    problems += check_kernels(report)
    return problems


def check_kernels(report: list[str]) -> list[str]:
    """The kernel self-test (cogumi.train.selftest) of every fast-path kernel a phase can launch on this box:
    compiled, forward and backward on tiny tensors whose rows have their own positions, against the plain formula."""
    import torch

    from cogumi.train.fastpath import fast_path
    from cogumi.train.packed_attention import usable_kernels
    from cogumi.train.selftest import SWITCH_OF, run_checks

    device = torch.device("cuda")
    with fast_path("auto", "cuda") as applied:
        pieces = [*applied.get("kernels", []), *(f"attention:{k}" for k in usable_kernels(device, torch.bfloat16)),
                  "fused_lora", "chunked_loss"]
        checks = run_checks(pieces, device, torch.bfloat16)
    if not applied["liger"]:
        report.append("kernels rms_norm, rope, swiglu: not used (liger-kernel not installed; train.liger=auto runs "
                      "the plain modules)")
    report.extend(f"kernel {check.line()}" for check in checks)
    return [f"kernel self-test failed: {check.line()}; turn it off with "
            f"{SWITCH_OF.get(check.name.split(':')[0], 'train.liger=off')}" for check in checks if not check.passed]


def check_flash_attn(problems: list[str]) -> str:
    try:
        import torch
        from flash_attn import flash_attn_func
    except ImportError:
        return "sdpa (flash-attn not installed; `make setup` installs its wheel when one is reachable)"
    try:
        q = torch.randn(1, 16, 4, 64, device="cuda", dtype=torch.bfloat16)
        out = flash_attn_func(q, q, q, causal=True)
        torch.cuda.synchronize()
        assert out.shape == q.shape and torch.isfinite(out).all()
    except Exception as err:  # a broken wheel (ABI/CUDA mismatch) shows up here, not at import
        problems.append(f"flash-attn imports but a tiny attention call fails: {err}")
        return "broken flash-attn"
    import flash_attn

    return f"flash_attention_2 (flash-attn {flash_attn.__version__}, tiny call ok)"


def check_disk(report: list[str], checkpoint_dir: Path) -> list[str]:
    problems = []
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    places = {"checkpoints": checkpoint_dir, "hub cache (HF_HOME)": hf_home, "root /": Path("/")}
    seen = {}
    for label, path in places.items():
        probe = path
        while not probe.exists():
            probe = probe.parent
        usage = shutil.disk_usage(probe)
        device = os.stat(probe).st_dev
        same = f" (same filesystem as {seen[device]})" if device in seen else ""
        seen.setdefault(device, label)
        used = 100 * usage.used / (usage.used + usage.free)  # as df and monitor_disk.py count it
        report.append(f"disk {label}: {path} — {usage.free / GIB:.1f} GiB free of {usage.total / GIB:.1f} GiB "
                      f"({used:.0f}% used){same}")
        if label == "checkpoints" and used >= 90:
            problems.append(f"{path} is {used:.0f}% full: free space before training (see docs/TROUBLESHOOTING.md)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", action="append", help="lock file(s) to compare against (default: all present)")
    parser.add_argument("--checkpoints", default=str(REPO_ROOT / "checkpoints"))
    args = parser.parse_args(argv)
    locks = [Path(p) for p in (args.lock or [REPO_ROOT / p for p in DEFAULT_LOCKS])]
    locks = [p for p in locks if p.exists()]
    report = [f"python {sys.version.split()[0]} at {sys.executable}"]
    problems = check_versions(locks)
    report.append(f"packages: {'all' if not problems else 'NOT all'} match {', '.join(p.name for p in locks)}")
    problems += check_torch(report)
    problems += check_disk(report, Path(args.checkpoints))
    print("\n".join(f"  {line}" for line in report))
    if problems:
        print("\nSTACK CHECK FAILED:", file=sys.stderr)
        for problem in problems[:15]:
            print(f"  - {problem}", file=sys.stderr)
        if len(problems) > 15:
            print(f"  ... and {len(problems) - 15} more", file=sys.stderr)
        print("Fix: run `make setup` (it syncs .venv to the lock exactly); if you changed requirements/*.in, "
              "run `make lock` first.", file=sys.stderr)
        return 1
    print("stack check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
