# `make demo`: set up .venv, prepare the default data, fine-tune on CPU, print the metrics.
# `make test`: set up .venv, prepare the data, run the test suite (`make test-fast`: unit tests only).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup data demo test test-fast clean

$(STAMP): requirements-setup.txt requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# set-up's own tools first, pinned (pip, setuptools, wheel, setuptools_scm)
	$(PY) -m pip install -q -r requirements-setup.txt
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	# the sdists (deepspeed, seqeval) build against what is installed: deepspeed needs the
	# torch above, and the pinned tools build the rest, so no build isolation
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt -r requirements.txt
	# the project itself, editable (a path entry, so a second checkout runs its own code): the `fine-tune` command
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(VENV)/bin/fine-tune prepare-data

demo: data
	$(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml \
		train.py --config recipes/sentiment.yaml --overwrite_output_dir

# two workers (pytest-xdist); each test file runs whole on one worker, so its shared runs are made once
test: data
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=25 tests

# the unit tests alone (in-process, no training subprocesses): about a minute
test-fast: setup
	$(PY) -m pytest -q -m "not integration" tests

clean:
	rm -rf $(VENV) data runs
