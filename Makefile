# `make demo` and `make test` install what they need into .venv on first use (about 2 minutes,
# ~7 GB: the PyPI torch wheel is a CUDA build, which also runs on CPU).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# Nothing here needs the network once installed: the embedded model and corpus are local.
export HF_HUB_OFFLINE ?= 1
export UNSLOTH_DISABLE_STATISTICS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/harness run sweeps/demo.yaml

# Two test processes (pytest-xdist), a file each at a time: the tests wait on servers, schedulers
# and subprocesses a third of the time; each process keeps torch to one thread (tests/conftest.py).
TEST_PROCESSES ?= 2

test: install
	WANDB_MODE=offline $(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

clean:
	rm -rf results/*/
