# dit: one command each for a newcomer. `make train` and `make test` run `make setup` first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Install into the active virtualenv / conda env if there is one, else into .venv/ here.
ifneq ($(VIRTUAL_ENV),)
  ENV_DIR := $(VIRTUAL_ENV)
else ifneq ($(CONDA_PREFIX),)
  ENV_DIR := $(CONDA_PREFIX)
else
  ENV_DIR := $(CURDIR)/.venv
endif
PY := $(ENV_DIR)/bin/python
# One stamp per (checkout, environment): re-run setup when pyproject.toml changes.
STAMP := .make/setup-$(subst /,_,$(ENV_DIR)).stamp
# The one place the path is written: dit/data/fashion_mnist.py (ROOT), read here without Python (before setup).
FMNIST_DIR := $(shell sed -n 's/^ROOT = "\(.*\)"$$/\1/p' dit/data/fashion_mnist.py)
PYTEST_ARGS ?=

.PHONY: help setup test test-all lint format train fid ablation normalisation silhouette speedrun publish report guidance_ema few_step zoo fashion-mnist chromium demo clean \
  bench-sample bench-train bench-kernel bench-extract

help:
	@echo "make setup     install everything (env: $(ENV_DIR))"
	@echo "make test      fast test suite as a first run (empty caches), both cores (~5.5 min of tests, ~8.5 min with set-up, 2 CPU cores)"
	@echo "make test-all  also the slow tests (retraining the domain classifier, soak-style runs)"
	@echo "make lint      ruff: lint and formatting check (CI runs it)"
	@echo "make format    ruff: fix imports and format the tree"
	@echo "make train     train the tiny model on Fashion-MNIST and write sample grids"
	@echo "make demo      the model of make train in a browser page (Gradio, on 127.0.0.1:7860; ARGS=\"checkpoint=[A,B]\" ...)"
	@echo "make fid       sample from make train's model and compute FID (domain metric; Inception if weights present);"
	@echo "               autoguidance by its step 1000 (GUIDANCE=cfg SCALE=2: classifier-free guidance)"
	@echo "make ablation  the conditioning study: every block x 3 seeds (~16 min a run, two at a time on 2 cores; results committed, a re-run trains only what is unfinished), report in studies/ablation_conditioning/report.md"
	@echo "make normalisation  which statistics the condition should modulate: 6 arms x 3 seeds (~2 h 30 min), report in studies/normalisation/report.md"
	@echo "make silhouette     Fashion-MNIST from silhouettes: spade vs map as channels vs map as tokens, 3 seeds (~40 min)"
	@echo "make publish STUDY=<name>  copy a study's results from outputs/studies/<name>/ into studies/<name>/runs/"
	@echo "make report STUDY=<name>   the report of a study from its committed runs (studies/<name>/report.md)"
	@echo "make guidance_ema  post-hoc EMA and autoguidance study: 3 runs + small guides, then studies/guidance_ema/plan.yaml's evaluations"
	@echo "make few_step  MeanFlow and shortcut study: 9 runs (fine-tuned from guidance_ema's flow runs, from scratch), then"
	@echo "               studies/few_step/plan.yaml's evaluations at 1, 2, 4 calls against the flow model's samplers"
	@echo "make zoo       print parameters / GFLOPs of every size x conditioning block"
	@echo "make bench-sample   sampling images/s: ours vs diffusers DiTPipeline (ARGS=... to change)"
	@echo "make bench-train    training steps/s: our loop vs a plain diffusers loop (ARGS=... to change)"
	@echo "make bench-kernel   fused adaLN kernel vs eager and torch.compile (needs a CUDA GPU)"
	@echo "make bench-extract  latent extraction images/s: DataLoader workers vs the image-by-image loop"

setup: $(STAMP) fashion-mnist chromium

# requirements.lock: the versions CI tested, as constraints (a new machine gets the same torch, numpy, ...).
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || python3 -m venv $(ENV_DIR)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[dev,demo]'
	@# gradio writes a hash seed into its own package on first import: done here, as part of installing it
	$(PY) -c "from gradio.utils import get_hash_seed; get_hash_seed()"
	@mkdir -p .make && touch $@

# Debian's dataset-fashion-mnist package: the four idx files under $(FMNIST_DIR).
fashion-mnist:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$sudo apt-get update -qq && $$sudo apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "warning: no apt-get; put the Fashion-MNIST idx files in $(FMNIST_DIR) or set data.root=" >&2; \
	  fi; \
	fi

# Debian's chromium and its driver, for the demo's browser test (tests/test_demo.py; no browser is downloaded).
chromium:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$sudo apt-get update -qq && $$sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	  else \
	    echo "warning: no apt-get; install chromium and chromedriver for the demo's browser test (else it is skipped)" >&2; \
	  fi; \
	fi

# Both as a first run (tests/first_run.sh: empty caches in a temporary directory, nothing written outside
# it and the repository), on every core (pytest-xdist; TEST_JOBS=0 runs in one process).
TEST_JOBS ?= auto
# worksteal: a worker that runs out of tests takes queued ones from the other (the long tests do not end alone).
test: setup
	tests/first_run.sh $(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal $(PYTEST_ARGS)

test-all: setup
	tests/first_run.sh $(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal -m "" $(PYTEST_ARGS)

# Configured in pyproject.toml ([tool.ruff]).
lint: setup
	$(ENV_DIR)/bin/ruff check .
	$(ENV_DIR)/bin/ruff format --check .

format: setup
	$(ENV_DIR)/bin/ruff check --fix .
	$(ENV_DIR)/bin/ruff format .

train: setup
	$(PY) train.py experiment=fashion_mnist_cpu $(ARGS)

# python -m dit.demo on make train's model (RUN=...), or on what ARGS names (ARGS="checkpoint=[A,B] port=8000").
demo: setup
	$(PY) -m dit.demo checkpoint=$(RUN)/model $(ARGS)

# Sampling + FID on what `make train` wrote: the Fashion-MNIST domain metric always, Inception FID
# too when its weights are in the torch hub cache.
RUN ?= outputs/fashion_mnist-dit_ti4-adaln_zero
FID_N ?= 500
# null: the objective's default sampler (flow: euler); for a DDPM model e.g. SAMPLER=ddim
SAMPLER ?= null
# Autoguidance by the run's own checkpoint at half of training (make train keeps step 1000 of 2,000) at scale 2.5: in
# the guidance study (docs/guidance_ema.md) it beat classifier-free guidance at its best scale (2) at the same 50 model
# calls an image. GUIDANCE=cfg SCALE=2: classifier-free guidance (what the README's make fid figures used).
GUIDANCE ?= auto
GUIDE ?= @1000
SCALE ?= 2.5
# where torch (and torch-fidelity) keep hub weights: torch.hub.get_dir() ($TORCH_HOME/hub, $XDG_CACHE_HOME/torch/hub or
# ~/.cache/torch/hub); `=`: asked only when make fid runs
INCEPTION = $(shell $(PY) -c 'import torch; print(torch.hub.get_dir())')/checkpoints/weights-inception-2015-12-05-6726825d.pth
fid: setup
	$(PY) sample.py checkpoint=$(RUN)/model num_images=$(FID_N) sampler=$(SAMPLER) steps=25 guidance=$(GUIDANCE) \
	  guide=$(GUIDE) cfg_scale=$(SCALE) out_dir=$(RUN)/fid_samples overwrite=true
	$(PY) -m dit.eval fid $(RUN)/fid_samples/samples.npz fashion_mnist --metric fashion_mnist
	@if [ -f $(INCEPTION) ]; then $(PY) -m dit.eval fid $(RUN)/fid_samples/samples.npz fashion_mnist; \
	else echo "(Inception FID skipped: $(INCEPTION) not found; see README)"; fi

# Studies (studies/README.md): a sweep trains into outputs/studies/<name>/ (ignored, with the weights);
# `make publish` copies its results into studies/<name>/runs/ (committed), `make report` renders them into
# studies/<name>/report.md, its figures beside it (docs/ has the hand-written pages that discuss them).
STUDY ?= ablation_conditioning
SWEEP = outputs/studies/$(STUDY)
# how a study's report groups its runs into arms (dit.analysis.report --by), and the arm time to FID is measured against
REPORT_ARGS_speedrun := --by arm
REPORT_ARGS_silhouette := --by arm
REPORT_ARGS_normalisation := --by model.block model.norm --baseline "block=adaln_zero, norm=layernorm"
publish: setup
	$(PY) -m dit.analysis.study publish $(SWEEP) studies/$(STUDY)

report: setup
	$(PY) -m dit.analysis.report studies/$(STUDY) $(REPORT_ARGS_$(STUDY))

# The studies: `make <target>` restores the committed runs into the sweep directory (a fresh clone trains only the runs
# not committed as finished; re-running resumes unfinished runs and skips finished ones), sweeps the study's experiment
# JOBS runs at a time with one thread each, publishes the results and writes the report. The report is written even
# when some runs failed (it lists them), and make then exits non-zero. Each target: its study (studies/<name>/) and
# its experiment (configs/experiment/<name>.yaml).
# - ablation: the conditioning study, every block x 3 seeds (~16 min a run, two at a time).
# - normalisation (issue 28): six arms that differ only in the statistics the condition modulates, 3 seeds, the
#   conditioning study's recipe (~2 h 30 min); discussed in docs/normalisation.md.
# - silhouette (issue 28): SPADE against the map as input channels and as in-context tokens, 3 seeds, 2,000 steps
#   each (~40 min); discussed in docs/normalisation.md.
# - speedrun (issue 24): make train's recipe and each training accelerator alone, 3 seeds, time to FID; 8 arms x 3
#   seeds of ~40 min each (5 FIDs on 1,000 samples), two at a time: ~8 h on the 2-core machine.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
STUDIES := ablation normalisation silhouette speedrun
ablation: STUDY = ablation_conditioning
ablation: EXPERIMENT = ablate_conditioning
normalisation: STUDY = normalisation
normalisation: EXPERIMENT = ablate_normalisation
silhouette: STUDY = silhouette
silhouette: EXPERIMENT = silhouette
speedrun: STUDY = speedrun
speedrun: EXPERIMENT = speedrun
$(STUDIES): setup
	$(PY) -m dit.analysis.study restore studies/$(STUDY) $(SWEEP)
	status=0; OMP_NUM_THREADS=1 $(PY) train.py experiment=$(EXPERIMENT) hydra/launcher=pool \
	  hydra.launcher.n_jobs=$(JOBS) hydra.sweep.dir=$(SWEEP) $(ARGS) || status=$$?; \
	$(PY) -m dit.analysis.study publish $(SWEEP) studies/$(STUDY); \
	$(PY) -m dit.analysis.report studies/$(STUDY) $(REPORT_ARGS_$(STUDY)) && exit $$status

# - guidance_ema (issue 46): make train's recipe with EDM2's power-function EMA profiles, 3 seeds, and a small guide
#   model; then the evaluations of studies/guidance_ema/plan.yaml (post-hoc EMA widths x guidance x scale), each stage
#   measuring only what studies/guidance_ema/results.jsonl lacks, and the report (docs/guidance_ema.md).
GUIDANCE_EMA_STAGES ?= pilot select_scale select_auto report
guidance_ema: setup
	OMP_NUM_THREADS=1 $(PY) train.py experiment=guidance_ema hydra/launcher=pool hydra.launcher.n_jobs=$(JOBS) \
	  hydra.sweep.dir=outputs/studies/guidance_ema $(ARGS)
	for stage in $(GUIDANCE_EMA_STAGES); do $(PY) -m dit.analysis.posthoc measure outputs/studies/guidance_ema \
	  studies/guidance_ema/plan.yaml --stage $$stage -o studies/guidance_ema/results.jsonl \
	  --grids studies/guidance_ema/grids || exit 1; done
	$(PY) -m dit.analysis.posthoc report studies/guidance_ema/results.jsonl studies/guidance_ema/plan.yaml \
	  -o studies/guidance_ema/report.md --grids studies/guidance_ema/grids

# - few_step (issue 48): MeanFlow and shortcut models fine-tuned from the guidance study's 3 flow runs (trained here
#   first if missing: make guidance_ema's main runs) and MeanFlow from scratch (configs/experiment/few_step.yaml); then
#   studies/few_step/plan.yaml's evaluations (the selections of an EMA width and a guidance scale, then the report's),
#   measuring only what studies/few_step/results.jsonl lacks, and the report (docs/few_step.md). Published runs
#   (studies/few_step/runs/, make publish STUDY=few_step) are restored first, so a fresh clone trains only what is not
#   finished.
FEW_STEP_RUNS ?= flow meanflow_ft shortcut_ft meanflow meanflow_ft_w3 imf_ft
few_step: setup
	$(PY) -m dit.analysis.study restore studies/few_step outputs/studies/few_step
	OMP_NUM_THREADS=1 $(PY) train.py experiment=guidance_ema +guidance_ema=main hydra/launcher=pool \
	  hydra.launcher.n_jobs=$(JOBS) hydra.sweep.dir=outputs/studies/guidance_ema
	OMP_NUM_THREADS=1 $(PY) train.py experiment=few_step hydra/launcher=pool hydra.launcher.n_jobs=$(JOBS) \
	  hydra.sweep.dir=outputs/studies/few_step $(ARGS)
	for stage in select_ema select_scale; do $(PY) -m dit.analysis.posthoc measure outputs/studies/few_step \
	  studies/few_step/plan.yaml --stage $$stage -o studies/few_step/results.jsonl || exit 1; done
	for run in $(FEW_STEP_RUNS); do $(PY) -m dit.analysis.posthoc measure outputs/studies/few_step \
	  studies/few_step/plan.yaml --stage report --run $$run -o studies/few_step/results.jsonl \
	  --grids studies/few_step/grids || exit 1; done
	$(PY) -m dit.analysis.posthoc report studies/few_step/results.jsonl studies/few_step/plan.yaml \
	  -o studies/few_step/report.md --grids studies/few_step/grids

zoo: setup
	$(PY) -m dit.zoo

bench-kernel: setup
	$(PY) benchmarks/bench_kernel.py $(ARGS)

bench-train: setup
	$(PY) benchmarks/bench_train.py $(ARGS)

bench-sample: setup
	$(PY) benchmarks/bench_sample.py $(ARGS)

bench-extract: setup
	$(PY) benchmarks/bench_extract.py $(ARGS)

clean:
	rm -rf .make .pytest_cache
