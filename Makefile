# make demo   train a small model with learned quantizers, export, print a table
# make test   lint + the whole test suite;  make test-quick skips slow tests
# make bench  every method at 8/4/3/2 bits vs float and tfmot -> docs/RESULTS.md (about 25
#             minutes on a quiet 2-core host);  make bench-quick is a few-minute smoke run of it
# make recipes  every small training recipe on MNIST-10k, in its own process -> docs/RECIPES.md
# make models  keras.applications families (MobileNet, DenseNet, ...) quantized, exported and
#             verified on x86 and arm64, beside post-training int8 and tfmot -> docs/MODELS.md
# make arm64  once: an emulated arm64 LiteRT (QEMU + Debian arm64 Python) in .arm64/, for
#             export --verify_arm64 and the arm64 tests; offline after that
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install arm64 demo test test-quick lint format overhead bench bench-quick recipes models clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,lite,plots]"
	touch $(STAMP)

arm64: install
	$(PY) -m export.arm64_env

demo: install
	-$(PY) -m export.arm64_env
	$(PY) -m train.demo

lint: install
	$(PY) -m ruff check tfquant train export benchmarks tests
	$(PY) -m ruff format --check tfquant train export benchmarks tests

format: install
	$(PY) -m ruff format tfquant train export benchmarks tests
	$(PY) -m ruff check --fix tfquant train export benchmarks tests

test: lint
	$(PY) -m pytest -n 2 --durations=15 tests

test-quick: lint
	$(PY) -m pytest -n 2 -m "not slow" tests

overhead: install
	$(PY) -m pip install --quiet -e ".[baseline]"
	$(PY) -m benchmarks.overhead

bench: install
	$(PY) -m pip install --quiet -e ".[baseline]"
	$(PY) -m benchmarks.results

bench-quick: install
	$(PY) -m benchmarks.results --quick

models: install
	-$(PY) -m export.arm64_env
	$(PY) -m pip install --quiet -e ".[baseline]"
	$(PY) -m benchmarks.models --output=docs/MODELS.md

recipes: install
	$(PY) -m benchmarks.recipes --output_dir=recipes_output --results_md=docs/RECIPES.md

clean:
	rm -rf $(VENV) .arm64 demo_output recipes_output models_output
