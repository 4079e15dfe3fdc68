# sdtune — the two commands a fresh clone needs:  `make run` (the whole pipeline, locally) and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SDTUNE := $(VENV)/bin/sdtune
STAMP := $(VENV)/.installed
HOME_DIR := .sdtune
TINY_MODEL := $(HOME_DIR)/models/tiny-sd15-pretrained-v
PRETRAINED_BASE := sdtune/assets/tiny-sd15-pretrained
SAMPLE_DATA := $(HOME_DIR)/sample-data
CONFIG ?= configs/debug/tiny_cpu.yaml
REGISTRY ?= ghcr.io/sdtune
# On 2 cores, torch threads competing with any other process make steps erratic and up to 50x slower.
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1
# Test files run in parallel, one single-threaded worker per core (at most 4); TEST_WORKERS=0 runs them in-process.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))")

.PHONY: help venv run test test-learning test-fast fuzz lint format compile manifests-check images bench clean pretrained-base pretrained-base-v

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[train,track,kfp,faces,heif,dev]'
	@touch $@

venv: $(STAMP)  ## create .venv (torch first, then sdtune with its extras)

# The pre-trained tiny base ships in the package (sdtune/assets/): copying it takes a second.
$(TINY_MODEL)/model_index.json: | $(STAMP)
	$(SDTUNE) models tiny --arch sd15 --pretrained --out $(TINY_MODEL)

# 20 views of the robot: with caption.holdout_fraction 0.4, 12 train and 8 held out for the evaluation.
$(SAMPLE_DATA)/.complete: | $(STAMP)
	$(SDTUNE) sample-data --count 20 --out $(SAMPLE_DATA)
	@touch $@

run: $(STAMP) $(TINY_MODEL)/model_index.json $(SAMPLE_DATA)/.complete  ## run the whole pipeline locally on the pre-trained tiny model and sample data
	$(SDTUNE) run --local $(CONFIG)

test: $(STAMP)  ## run the test suite (CPU)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-learning: $(STAMP)  ## fine-tune the pre-trained tiny base and check each method learns the subject
	SDTUNE_LEARNING_TESTS=1 $(PY) -m pytest -q tests/learning

test-fast: $(STAMP)  ## the suite without the slow end-to-end tests
	$(PY) -m pytest -q -m "not slow"

fuzz: $(STAMP)  ## the parser fuzz tests with many more examples (FUZZ_EXAMPLES=5000; not part of make test)
	SDTUNE_FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-5000} $(PY) -m pytest -q tests/security/test_fuzz.py

lint: $(STAMP)  ## ruff + hadolint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@for f in images/*/Dockerfile; do [ -f "$$f" ] || continue; echo "hadolint $$f"; $(VENV)/bin/hadolint "$$f" || exit 1; done

format: $(STAMP)  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

compile: $(STAMP)  ## compile the pipeline to dist/pipelines/personalize.yaml
	$(SDTUNE) compile --config $(CONFIG) --out dist/pipelines/personalize.yaml

manifests-check: $(STAMP)  ## render every kustomize overlay and validate offline against schemas
	$(PY) tools/manifests_check.py

images:  ## build and push the container images, record their digests in images/digests.json (needs Docker)
	@if docker info >/dev/null 2>&1; then mkdir -p build; \
	  for d in images/*/; do n=$$(basename $$d); docker buildx build -f $$d/Dockerfile -t $(REGISTRY)/$$n:$$($(PY) -c 'import sdtune; print(sdtune.__version__)') --push --metadata-file build/$$n.json . || exit 1; \
	    $(PY) images/record_digest.py $$n build/$$n.json || exit 1; done; \
	else echo "no Docker engine here: skipping image builds (Dockerfiles are linted by 'make lint')"; fi

pretrained-base: $(STAMP)  ## rebuild the earlier ε-prediction tiny SD 1.x (--objective epsilon; about 15 min on one CPU core; see its MODEL_CARD.md)
	$(SDTUNE) models pretrain --out $(PRETRAINED_BASE)

pretrained-base-v: $(STAMP)  ## rebuild the shipped tiny SD 1.x, --pretrained's default (v-prediction; about 35 min on one CPU core; see its MODEL_CARD.md)
	$(SDTUNE) models pretrain --out $(HOME_DIR)/pretrain-stage1 --seed 0 --vae-steps 400 --unet-steps 2700 --v-prediction --zero-terminal-snr
	$(SDTUNE) models pretrain --out $(PRETRAINED_BASE)-v --seed 0 --unet-steps 2700 --v-prediction --zero-terminal-snr --init-from $(HOME_DIR)/pretrain-stage1

bench: $(STAMP)  ## CPU benchmark suite (not part of make test)
	$(PY) -m sdtune.bench

clean:  ## remove local outputs (keeps .venv)
	rm -rf $(HOME_DIR) dist .pytest_cache
