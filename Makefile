# The two commands: `make run` (the default job on the built-in synthetic benchmark) and `make test`.
# Both install into .venv first when needed (pip, pinned torch/torchvision).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: setup browser run demo test lint format clean bench gpu-check

setup: $(STAMP) browser

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,demo]'
	@touch $(STAMP)

# Headless Chromium for the demo page's browser test: Debian's package, driven by playwright (which never downloads
# browsers of its own). Installed with apt-get when missing, as root or with password-less sudo; where that is
# impossible the test skips and says why.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		echo "installing Debian's chromium for the demo page's browser test"; \
		($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null) \
			|| echo "warning: could not install chromium: the demo page's browser test will be skipped"; }

run: setup
	$(PY) -m src.run $(ARGS)

# The demo page on http://127.0.0.1:7860: CKPT=path [CKPT_B=path] (ARGS: more key=value options of src.demo).
# Without CKPT: the newest best checkpoint of the default job under outputs/mapper_synthetic/, trained first (make run,
# about 4 minutes on a CPU) when there is none.
demo: setup
	@ckpt="$(CKPT)"; newest() { ls -t outputs/mapper_synthetic/*/checkpoints/best-*.ckpt 2>/dev/null | head -n 1; }; \
	if [ -z "$$ckpt" ] && [ -z "$$(newest)" ]; then \
		echo "no checkpoint yet: training the default job first (make run)"; $(MAKE) --no-print-directory run ARGS= || exit 1; \
	fi; \
	$(PY) -m src.demo ckpt=$${ckpt:-$$(newest)} $(if $(CKPT_B),ckpt_b=$(CKPT_B)) $(ARGS)

# Two pytest-xdist workers (TEST_WORKERS=1: one process).
TEST_WORKERS ?= 2
test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q \
		$(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal) $(PYTEST_ARGS)

# Speed and memory per PEFT method (full-size MaPPER, random weights, each method in its own process).
bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m src.bench out=bench.json $(ARGS)

# On a machine with GPUs: bf16 train/eval figures of the full-size model per method on the first GPU
# (JSON in gpu-check.json), then, with 2+ GPUs, 20 DDP steps of it on all of them on the synthetic benchmark.
gpu-check: setup
	HF_HUB_OFFLINE=1 $(PY) -m src.bench methods=mapper,lora,full device=cuda precision=bf16 steps=10 batch=8 \
		data=false out=gpu-check.json
	@if [ "$$($(PY) -c 'import torch; print(torch.cuda.device_count())')" -gt 1 ]; then \
		HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m src.run task_name=gpu_check trainer=ddp model=mapper_base \
			model.pretrained=false vision_pretraining=null text_pretraining=null data.batch_size=8 \
			+trainer.max_steps=20 trainer.max_epochs=1 test=false logger=csv visualize=0 data.cache_samples=false; \
	fi

lint: setup
	$(VENV)/bin/ruff check src tests experiments

format: setup
	$(VENV)/bin/ruff format src tests

clean:
	rm -rf outputs multirun .pytest_cache
