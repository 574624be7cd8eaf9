# embbench — `make help` lists the targets. Everything installs into .venv from pyproject.toml.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp changes with pyproject.toml, so `setup` reinstalls only when dependencies change.
STAMP := $(VENV)/.embbench-$(shell cksum pyproject.toml | cut -d' ' -f1)
PARAMS ?=
export MLFLOW_DISABLE_TELEMETRY := true
export TF_CPP_MIN_LOG_LEVEL := 3
export TF_ENABLE_ONEDNN_OPTS := 0
# glibc's allocator and libgomp's wait settings (embbench/_malloc.py, which must agree:
# tests/test_malloc.py); both are read at process start, so the registered kernel carries them in its kernel.json env.
PROCESS_ENV := MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=536870912 \
  OMP_WAIT_POLICY=PASSIVE

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{sub(/%/, "<notebook>", $$1); printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}'

.PHONY: setup
setup: $(STAMP) ## create .venv, install embbench with its pinned dependencies, register the kernel

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name embbench --display-name "Python (embbench)" \
	  $(foreach kv,$(PROCESS_ENV),--env $(subst =, ,$(kv))) >/dev/null
	@rm -f $(VENV)/.embbench-* && touch $@

.PHONY: demo
demo: setup ## run the notebooks on the demo catalogue (embedded Milvus Lite + local MLflow)
	$(PY) -m embbench demo

.PHONY: test
test: setup ## run the test suite (lint included)
	$(PY) -m pytest -q

.PHONY: lint
lint: setup ## ruff check + ruff format --check over the package, tests and benchmarks; import-linter's layer contracts
	$(VENV)/bin/ruff check embbench tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff format --check embbench tests benchmarks

.PHONY: format
format: setup ## ruff format over the package, tests and benchmarks
	$(VENV)/bin/ruff format embbench tests benchmarks

.PHONY: lab
lab: setup ## JupyterLab on the project (http://127.0.0.1:8888)
	$(VENV)/bin/jupyter lab --no-browser --ip 127.0.0.1 --port 8888 $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: mlflow-ui
mlflow-ui: setup ## MLflow UI on the local store: open the link it prints (runs table, ML view)
	@echo "MLflow UI: open $$($(VENV)/bin/python -c 'from embbench.tracking import ui_link; \
	  print(ui_link(uri="sqlite:///$(CURDIR)/runs/mlflow.db"))' 2>/dev/null)"
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 \
	  --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --default-artifact-root $(CURDIR)/runs/mlartifacts

nb-%: setup ## run notebooks/<notebook>.ipynb with params/<notebook>.yaml (+ PARAMS="more.yaml ...")
	$(PY) -m embbench run-notebook $* -f params/$*.yaml $(foreach f,$(PARAMS),-f $(f))

.PHONY: report
report: setup ## render notebook 05 to a self-contained HTML report (reports/report.html)
	$(PY) -m embbench report -f params/05_analysis.yaml $(foreach f,$(PARAMS),-f $(f))

.PHONY: pipeline
pipeline: setup ## compile the grid into a Kubeflow pipeline (PARAMS="params/01_embed.yaml ..."; default all params/0*.yaml) -> pipeline.yaml
	$(PY) -m pip install --disable-pip-version-check -q -e '.[pipeline]'
	$(PY) -m embbench pipeline compile $(foreach f,$(or $(PARAMS),$(wildcard params/0*.yaml)),-f $(f)) \
	  --output $(or $(OUTPUT),pipeline.yaml) $(if $(IMAGE),--image $(IMAGE),)

.PHONY: bench
bench: setup ## run the benchmarks (prints ratios against their baselines; ~30 min on 2 cores)
	$(PY) benchmarks/bench_retrieval.py --n 20000 60000 --repeats 1 --skip milvus
	$(PY) benchmarks/bench_retrieval.py --milvus-scaling 10000 30000 60000 --rounds 1
	$(PY) benchmarks/bench_embedding.py

.PHONY: clean
clean: ## remove caches, runs and reports (keeps .venv and data/)
	rm -rf cache runs reports/*.html reports/notebooks
