# Two entry points: `make demo` (set up, then train the default job) and `make test` (set up, then run the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# BASE: raydistill, torch, Ray (what `make setup`, `make demo` and `make bench` need); FULL: and the test extra (pytest,
# and the figures' and the ONNX export's packages: the plots and onnx extras)
BASE := $(VENV)/.installed
FULL := $(VENV)/.installed-test

.PHONY: setup demo test bench clean

$(BASE): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $(BASE)

$(FULL): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(FULL) $(BASE)

setup: $(BASE)

demo: $(BASE)
	$(BIN)/raydistill train

test: $(FULL)
	$(BIN)/python -m pytest -q --durations=15 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: $(BASE)
	$(BIN)/python -m raydistill.bench

clean:
	rm -rf runs
