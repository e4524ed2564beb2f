# llmdpd-pl: every command a user needs, one target each.
PYTHON ?= python3
# The CPU wheel of this version sits on the project machines; anything looser pulls GBs of CUDA.
# GPU users: install your CUDA build of torch first (it is then kept), or override TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
DATA_DIR ?= data

.PHONY: help install test lint smoke demo collect fit-cpu test-cpu bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## install torch (CPU wheel unless one is present) and the package with dev extras
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev]"

test: install  ## install, then run the test suite
	$(PYTHON) -m pytest -q tests

lint:  ## ruff + mypy
	$(PYTHON) -m ruff check llmdpd_pl tests benchmarks
	$(PYTHON) -m mypy llmdpd_pl

smoke: install  ## collect + fit + test the tiny CPU config (about a minute)
	llmdpd collect --config configs/smoke.yaml
	llmdpd fit --config configs/smoke.yaml --trainer.logger.init_args.version smoke
	llmdpd test --config configs/smoke.yaml --trainer.logger.init_args.version smoke_test \
		--ckpt_path runs/smoke/smoke/checkpoints/last.ckpt

demo: install  ## the CPU demonstration end to end: collect, fit (<= 45 min), test (50 episodes per task)
	llmdpd collect --config configs/metaworld_cpu.yaml
	llmdpd fit --config configs/metaworld_cpu.yaml --trainer.logger.init_args.version demo
	llmdpd test --config configs/metaworld_cpu.yaml --trainer.logger.init_args.version demo_test \
		--ckpt_path runs/metaworld_cpu/demo/checkpoints/last.ckpt

bench:  ## benchmarks on an otherwise idle machine (JSON next to the scripts; figures in docs/performance.md)
	$(PYTHON) benchmarks/train_step.py
	$(PYTHON) benchmarks/rollout.py --num-envs 50 --action-selection sample
	$(PYTHON) benchmarks/rollout.py --config configs/metaworld_cpu.yaml --num-envs 10
	$(PYTHON) benchmarks/collect.py
