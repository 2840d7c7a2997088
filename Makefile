# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The registry's standard torch (a CUDA build that also runs on CPUs; what timm's torchvision pairs with), then
# mae_fast in editable mode without build isolation so the optional C++ extension compiles against that torch.
$(VENV)/.installed: setup.py | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip "setuptools>=70" wheel
	$(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q --no-build-isolation -e ".[test,dali]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mae-fast demo

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python -m pytest -q benchmarks/bench_*.py --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info mae_fast/*.so demo_out
