# make demo: create .venv, install, run the embedded end-to-end demo (CPU, no download).
# make test: create .venv, install, run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m codemae.cli pretrain --config configs/pretrain/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m codemae.cli bench --backbones vit_tiny hivit_tiny --img-size 128 --batch-size 32

clean:
	rm -rf $(VENV) runs .pytest_cache
