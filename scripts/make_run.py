"""What the Makefile runs for each target: PHASE, ARGS and the other make variables reach a script as data.

    make train PHASE='demo;touch X'                  refused (exit 2): not a phase name; nothing runs
    make train PHASE=demo ARGS='train.max_steps=2 "name=a b"'
        runs [python, scripts/train_phase1a_fullprecision.py, --phase, demo, train.max_steps=2, name=a b]

`make train PHASE='demo;touch X'` used to run `touch X` (ISSUES_LOG B50): $(PHASE) and $(ARGS) were pasted into shell
text. Now the Makefile never exports a user's value (make expands an exported value, `$(shell ...)` included) and
hands each one to this script single-quoted and unexpanded, as an environment variable (COGUMI_PHASE, COGUMI_ARGS,
COGUMI_GPUS, COGUMI_QUANT, COGUMI_LAST_EXIT; the switches under their own names). This script checks PHASE, GPUS and
QUANT, splits ARGS into words the way a shell would (quotes group words; `;`, `$(...)` and backticks are plain
characters) and runs the real command as an argv list, never through a shell.

    make_run.py [--record] [--launch] -- ARG...     ARG may hold {PHASE}, {RUN_NAME} or {QUANT}; ARGS is appended

--launch: GPUS=N > 1 runs the script under torchrun (DDP). --record: the command's own exit code goes to
LAST_EXIT.<run name> (one file per phase, e.g. .last_exit.phase1a) and to LAST_EXIT (the latest of any phase), since
make turns every failure into its own exit 2. COGUMI_DRY_RUN=1 prints the argv as JSON instead of running it.
Standard library only: it starts in milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# A phase name (1a, demo) or a path to a phase YAML: letters, digits and . _ / - only, and not an option.
PHASE_NAME = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_./-]*$")
PATH = PHASE_NAME
WORD = re.compile(r"^[A-Za-z0-9_]+$")
EXIT_USER_ERROR = 2


class BadVariable(Exception):
    def __init__(self, what: str, where: str, fix: str):
        super().__init__(what)
        self.lines = [f"ERROR: {what}", f"  where: {where}", f"  fix:   {fix}"]


def checked(name: str, pattern: re.Pattern, example: str) -> str:
    value = os.environ.get(f"COGUMI_{name}", "")
    if not pattern.match(value):
        raise BadVariable(f"{name} must be {example}, got {value!r}", where=f"make variable {name}",
                          fix=f"e.g. {name}={example.split()[-1]}; settings go into ARGS='key=value ...'")
    return value


def run_name(phase: str) -> str:
    """The run folder's name, as the configs name it: 1a -> phase1a, demo -> demo, configs/x.yaml -> x."""
    if phase.endswith((".yaml", ".yml")):
        return Path(phase).stem
    return f"phase{phase}" if (REPO_ROOT / "configs" / f"phase{phase}.yaml").exists() else phase


def build_argv(template: list[str], *, launch: bool) -> tuple[list[str], str]:
    """The command as an argv list, and the run name its exit code is recorded under."""
    needs = " ".join(template)
    uses_phase = "{PHASE}" in needs or "{RUN_NAME}" in needs
    phase = checked("PHASE", PHASE_NAME, "a phase name or a config path, e.g. 1a") if uses_phase else ""
    quant = checked("QUANT", WORD, "a quantization name, e.g. nf4") if "{QUANT}" in needs else ""
    name = run_name(phase) if phase else Path(template[0]).stem
    try:
        extra = shlex.split(os.environ.get("COGUMI_ARGS", ""))
    except ValueError as err:  # an unclosed quote
        raise BadVariable(f"ARGS cannot be split into words: {err}", where="make variable ARGS",
                          fix="close the quote, e.g. ARGS='train.max_steps=2 \"name=a b\"'") from None
    values = {"PHASE": phase, "RUN_NAME": name, "QUANT": quant}
    argv = [sys.executable, *(arg.format(**values) for arg in template), *extra]
    if launch:
        gpus = checked("GPUS", re.compile(r"^[1-9][0-9]*$"), "a number of GPUs, e.g. 2")
        if gpus != "1":
            argv[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", gpus]
    return argv, name


def record(code: int, base: str, name: str | None) -> None:
    for path in [base] + ([f"{base}.{name}"] if name else []):
        Path(path).write_text(f"{code}\n", encoding="utf-8")


def run(argv: list[str]) -> int:
    """The command's own exit code. Ctrl-C reaches it directly (same process group); a SIGTERM sent to this process
    is passed on, so the script's clean stop (exit 130) runs either way."""
    child = subprocess.Popen(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, _frame: child.send_signal(signum))
    code = child.wait()
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N (137 for kill -9)


def refuse(err: BadVariable) -> int:
    print("\n".join(err.lines), file=sys.stderr)
    return EXIT_USER_ERROR


def main(args: list[str]) -> int:
    flags = args[:args.index("--")] if "--" in args else []
    template = args[len(flags) + 1:] if "--" in args else args
    try:  # first: a LAST_EXIT that is not a plain file name is refused before anything runs, and never written
        last_exit = checked("LAST_EXIT", PATH, "a file name, e.g. .last_exit") if "--record" in flags else None
    except BadVariable as err:
        return refuse(err)
    try:
        argv, name = build_argv(template, launch="--launch" in flags)
    except BadVariable as err:
        code, name = refuse(err), None
    else:
        if os.environ.get("COGUMI_DRY_RUN") == "1":
            print(json.dumps(argv))
            return 0
        code = run(argv)
    if last_exit:
        record(code, last_exit, name)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
