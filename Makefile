# Quick start: `make demo` (install, run the demo manifest on the embedded tiny model)
#              `make test` (install, run the test suite). Both work offline on a CPU.
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: install demo dataset test clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) run_batch.py manifests/demo.jsonl --model tiny --out outputs/demo

# Dataset synthesis end to end on the embedded model: templates + wildcards + a sweep -> images scored by
# tiny-clip as they are written -> filtered, deduplicated webdataset shards -> a data loader reading them.
dataset: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m batch run manifests/dataset.jsonl --model tiny --wildcards manifests/wildcards \
		--clip-score tiny-clip --out outputs/dataset
	HF_HUB_OFFLINE=1 $(PYTHON) -m batch export outputs/dataset --to outputs/dataset-shards --format webdataset \
		--shard-size 16 --min-clip-score 25 --dedup 2
	$(PYTHON) examples/read_shards.py outputs/dataset-shards

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

clean:
	rm -rf outputs/demo outputs/dataset outputs/dataset-shards .pytest_cache
