# make demo: create .venv, install, run the embedded end-to-end demo (CPU, no download).
# make test: create .venv, install, run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench evidence evidence-mstar clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

DEMO := runs/demo
CKPT := $(DEMO)/checkpoints/last.pt

demo: $(STAMP)
	$(PY) -m codemae.cli pretrain --config configs/pretrain/demo.yaml run_dir=$(DEMO)
	$(PY) -m codemae.cli probe --checkpoint $(CKPT) --data synthetic --modality both --shots 0 --seeds 3 \
		--out $(DEMO)/probe.json
	$(PY) -m codemae.cli retrieval --checkpoint $(CKPT) --pairs synthetic --out $(DEMO)/retrieval.json
	$(PY) -m codemae.cli analyze --checkpoint $(CKPT) --pairs synthetic --out $(DEMO)/report

# Debian's chromium opens the analysis report in a test; installed here where absent and possible.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium could not be installed; the report's browser test will be skipped"

test: $(STAMP) chromium
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m codemae.cli bench --backbones vit_tiny hivit_tiny --img-size 128 --batch-size 32

# make evidence [HOURS=0.5]: the method comparison on ../shared/data (benchmarks/evidence.py, docs/evidence.md)
HOURS ?= 0.5
evidence: $(STAMP)
	$(PY) benchmarks/evidence.py --hours $(HOURS) --out runs/evidence/study_$(HOURS)h

# make evidence-mstar [HOURS=0.5]: the MSTAR-task encoder (joint MAE on MSTAR's train chips alone) against the
# small CNN and the HiViT from scratch, 5 fine-tuning seeds (docs/evidence.md)
evidence-mstar: $(STAMP)
	$(PY) benchmarks/evidence.py --hours $(HOURS) --methods mae_sar --skip retrieval segment --ft-seeds 5 \
	  --out runs/evidence/mstar_$(HOURS)h

clean:
	rm -rf $(VENV) runs .pytest_cache
