# chlib: the two commands a newcomer needs are `make demo` and `make test`.
# Each creates .venv from nothing when it is missing (python3 -m venv + pip install -e ".[dev]").

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.chlib-installed
RUN    ?= demo
DEMO_DATASET ?= datasets/demo
PYTEST_ARGS ?=

.PHONY: venv git-filter demo serve gpu-check test test-fast test-ipywidgets7 bench lint clean-demo

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@$(MAKE) --no-print-directory git-filter PY="$(PY)"
	@touch $(STAMP)

venv: $(STAMP)

# Inside a git checkout: the nbstripout filter that .gitattributes names, so `git add` strips
# the outputs JupyterLab autosaves into a notebook (cell ids kept). Rerunning it changes nothing.
git-filter:
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git config filter.nbstripout.clean '"$(abspath $(PY))" -m nbstripout --keep-id' && \
		git config filter.nbstripout.smudge cat && \
		git config filter.nbstripout.required true; fi

# The main job end to end on the built-in demo data: generate the demo dataset, extract
# features, train, evaluate, identify held-out recordings and the demo's sets, draw the
# explorer's figures and probe the embeddings for the demo's labels (instrument, rhythm).
# Training runs up to DEMO_EPOCHS epochs and keeps the epoch with the best retrieval mAP on the
# works held out for validation (the laptop recipe's rule), never looking at the test works.
DEMO_EPOCHS ?= 60
demo: $(STAMP)
	$(PY) -m chlib run 01_prepare 02_extract 03_train 05_evaluate 06_identify 07_explore 08_probe \
		--run $(RUN) -p dataset_dir $(DEMO_DATASET) -p max_epochs $(DEMO_EPOCHS)

# The identification service for the demo run (after `make demo`): a web page and a JSON API
# at http://127.0.0.1:8000 (PORT=...); Ctrl-C stops it.
PORT ?= 8000
serve: $(STAMP)
	$(PY) -m chlib serve --run runs/$(RUN) --dataset $(DEMO_DATASET) --port $(PORT)

# The whole test suite (fixture checks, notebooks under papermill, kill/resume tests), then the
# widget tests again against ipywidgets 7.7.1, the version Google Colab ships.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-ipywidgets7

IPYW7 := $(VENV)/ipywidgets7
WIDGET_TESTS := tests/test_widgets.py tests/test_ux_forms.py tests/test_ux_explorer.py \
	tests/test_ux_tables.py tests/test_ux_timeline.py
$(IPYW7)/.installed: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --target $(IPYW7) "ipywidgets==7.7.1" ipython_genutils
	@touch $@
test-ipywidgets7: $(IPYW7)/.installed
	PYTHONPATH=$(IPYW7) $(PY) -c "import ipywidgets as w; assert w.__version__ == '7.7.1', w.__version__"
	PYTHONPATH=$(IPYW7) $(PY) -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -m "not slow" \
		$(WIDGET_TESTS)

# Everything but the slow end-to-end tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

# Speed and memory benchmarks: each prints its figures and the ratios to its targets.
bench: $(STAMP)
	$(PY) bench/bench_extract.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_query.py
	$(PY) bench/bench_demo.py
	$(PY) bench/long_files.py --hours 2
	$(PY) bench/bench_timeline.py --sizes 10000 100000

# On a CUDA machine: the CQT, bf16 autocast, torch.compile and deterministic mode checked
# against the CPU, and the GPU's speed as ratios to the CPU's (bench/gpu_check.py).
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --device cuda

lint: $(STAMP)
	$(PY) -m ruff check chlib tests bench tools

clean-demo:
	rm -rf $(DEMO_DATASET) runs/$(RUN)
