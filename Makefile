# Two commands set everything up on a fresh clone: `make demo` runs the main job, `make test` the tests.
# Each creates the virtual environment .venv on first use (PyTorch, then the project with its test extra) and
# reuses it afterwards; it is rebuilt when pyproject.toml changes. Where no NVIDIA GPU is present the CPU build
# of torch is installed: a bare `pip install torch` would pull a multi-GB CUDA build.
#
#   make demo           the small problem-suite run (spring, three methods) ending in a convergence plot
#   make test           ruff, then the test suite (what CI runs)
#   make docs           build the documentation (warnings are errors) into docs/_build/html
#   make readme-table   re-run the main job in a fresh folder and print README's table with the time it took
#   make clean-env      remove .venv

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test docs readme-table clean-env

$(STAMP): pyproject.toml scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	TORCH_VERSION=$(TORCH_VERSION) bash scripts/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m problems run spring --quick --methods sqp-adam,adam-unc,adam-con

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest

docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html

readme-table: $(STAMP)
	$(BIN)/python scripts/readme_table.py

clean-env:
	rm -rf $(VENV)
