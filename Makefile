# Two entry points, both doing all the set-up a fresh Debian machine needs:
#   make train   venv + parnn + Fashion-MNIST, then train the default model and print test accuracy
#   make test    the same set-up, then the whole test suite
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
DATA_DIR ?= /usr/share/datasets/fashion-mnist
TRAIN_ARGS ?=

.PHONY: train test setup data clean

train: setup data
	$(VENV)/bin/parnn train $(TRAIN_ARGS)

test: setup data
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[mpi,sklearn,onnx,dev,peers]'
	touch $@

# The real data: Debian's package when we are root with apt, otherwise a verified download.
data: setup
	@if $(VENV)/bin/parnn data info >/dev/null 2>&1; then \
		echo "Fashion-MNIST found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else \
		$(VENV)/bin/parnn data fetch; \
	fi

clean:
	rm -rf $(VENV) build src/*.egg-info
