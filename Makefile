# Quick start: `make demo` (install, run the demo manifest on the embedded tiny model)
#              `make test` (install, run the test suite). Both work offline on a CPU.
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: install demo test clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) run_batch.py manifests/demo.jsonl --model tiny --out outputs/demo

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

clean:
	rm -rf outputs/demo .pytest_cache
