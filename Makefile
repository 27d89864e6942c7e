# imagenetpp — every entry point a user needs. `make setup && make demo` on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/demo_knn_img.yaml
OUT     ?= out
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo test curate lint format bench clean labels

setup: $(STAMP)

# Re-installs only when the pins or the package metadata change: a second `make setup` takes seconds.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(BIN)/imagenetpp demo --out $(OUT)/demo

test: setup
	$(BIN)/python -m pytest -q --durations=15 tests

curate: setup
	$(BIN)/imagenetpp curate $(CONFIG) --out $(OUT)

bench: setup
	$(BIN)/python bench/run.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Regenerates curators/data/imagenet1k.tsv from WordNet 3.0 (needs Debian's wordnet-base).
labels: setup
	$(BIN)/python scripts/derive_labels.py > curators/data/imagenet1k.tsv

clean:
	rm -rf $(OUT) .cache bench/work
