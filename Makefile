# The README's contract: `make run` (the main job) and `make test`. Everything installs into
# a local virtual environment on first use; nothing needs to be installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export DEMO_OPENAI_KEY ?= sk-demo-local-not-a-secret

.PHONY: install tools run demo test conformance fuzz lint bench soak envoy-config clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## wrk (Debian package) drives the benchmark and its smoke test; a C compiler builds the
## compiled fast lane (src/extproc/lane/lane.c: envoy.fast_lane_compiled), which tests run;
## valgrind counts Envoy's instructions (bench/envoy_instructions.py and its smoke test)
tools:
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; } \
	  || { echo "could not install wrk (needs root or sudo): apt-get install wrk"; exit 1; }
	@command -v cc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc >/dev/null; } \
	  || { echo "could not install a C compiler (needs root or sudo): apt-get install gcc"; exit 1; }
	@command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; } \
	  || { echo "could not install valgrind (needs root or sudo): apt-get install valgrind"; exit 1; }

## make run: Envoy + the service + demo backends in the foreground (Ctrl-C stops all);
## make run CONFIG=my.yaml: Envoy + the service against that config's own backends
run: install
ifdef CONFIG
	$(PY) -m extproc.cli up --config $(CONFIG)
else
	$(PY) -m extproc_dev.stack --config config/demo.yaml
endif

## make demo: start the stack, send real requests with the openai SDK, print a table, stop
demo: install
	$(PY) -m extproc_dev.demo --config config/demo.yaml

## make test: lint + the whole suite (tests/unit: no Envoy, no process; tests/e2e: real Envoy)
test: install tools
	$(PY) -m ruff check src tests bench conformance
	$(PY) -m pytest -q

## make conformance: a real vLLM (CPU, a tiny random model; installed once into a cached venv
## under ~/.cache/llm-extproc) against our vLLM emulator and behind the gateway
conformance: install
	$(PY) -m pytest -q -p no:cacheprovider conformance

## make fuzz: the property tests at 20,000 examples each (200,000 in all), and the compiled
## lane's readers on 5 million hostile bodies and answers under the sanitizers
fuzz: install tools
	HYPOTHESIS_EXAMPLES=20000 $(PY) -m pytest -q tests/unit/test_properties.py
	LANE_FUZZ_ITERATIONS=5000000 $(PY) -m pytest -q tests/e2e/test_lane_sanitized.py

lint: install
	$(PY) -m ruff check src tests bench conformance

## make bench: bare Envoy vs Envoy + llm-extproc, side by side (not part of make test)
bench: install tools
	$(PY) bench/bench.py

## make soak: 10 minutes of 1-4 MB requests, resident memory sampled (bench/results/soak.json)
soak: install tools
	$(PY) bench/soak.py --seconds 600

## make envoy-config: re-render envoy/demo.yaml and envoy/compose.yaml
envoy-config: install
	$(PY) -m extproc.cli envoy --config config/demo.yaml --out envoy/demo.yaml
	$(PY) -m extproc.cli envoy --config config/compose.yaml --out envoy/compose.yaml

clean:
	rm -rf $(VENV) .run .pytest_cache .ruff_cache
