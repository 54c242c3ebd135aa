# The two commands a newcomer needs are `make demo` and `make test`; both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
MUTATION_STAMP := $(VENV)/.mutation-installed

.PHONY: demo demo-cluster test lint typecheck unit docs bench bench-quick crash-test cluster-crash-test service-smoke mutation clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed (found %s)" % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/event-engine demo

# Two instances and the simulator on a throw-away PostgreSQL (initdb/pg_ctl, or the server
# EVENT_ENGINE_TEST_POSTGRES names); the leader is killed halfway. Longer: ARGS="--duration 90"
demo-cluster: $(STAMP)
	$(BIN)/python -m engine.sandbox.demo_cluster $(ARGS)

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy engine

# The rule tests shipped with rules/ run first, so pytest's summary stays the last line.
unit: $(STAMP)
	$(BIN)/event-engine test rules
	$(BIN)/pytest -q

# The README's table of action kinds, from each kind's module (a test fails when it is stale).
docs: $(STAMP)
	$(BIN)/python -m engine.actions README.md

# SIGKILLs the daemon at random instants while events stream in, then checks nothing was lost
# or doubled (`make test` runs a 3-kill version). Try other seeds: scripts/crash-test --seed 7
crash-test: $(STAMP)
	$(BIN)/python scripts/crash-test

# Three instances on one PostgreSQL (a throw-away one unless EVENT_ENGINE_TEST_POSTGRES names
# one), fed by the poller and Data Streamer pushes; 24 faults at random instants (the leader
# SIGKILLed and SIGSTOPped past its 10 s lease, instances killed and cut off the database),
# then checks nothing was lost or doubled and no stretch without a leader reached 15 s
# (`make test` runs a 3-fault version). Try other seeds: scripts/cluster-crash-test --seed 7
cluster-crash-test: $(STAMP)
	$(BIN)/python scripts/cluster-crash-test

# The install steps of docs/service.md run for real (as root, in a throw-away namespace),
# then the engine as the systemd unit runs it: start, reload (SIGHUP), stop. Not in `test`.
service-smoke:
	scripts/service-smoke

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

# Each figure beside its reference measured in the same run, as a ratio, PASS/FAIL against its
# target (docs/performance.md); writes BENCHMARKS.md. bench-quick: reduced sizes, under two minutes.
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.run --quick

$(MUTATION_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,mutation]'
	@touch $(MUTATION_STAMP)

# Small deliberate bugs in the core, each judged against its module's test files (pyproject's
# [tool.mutation.against]) in a forked pytest child; prints the score per module
# (docs/testing.md). Not in `test`. `make mutation JOBS=2` is the whole core;
# `MODULES=engine/state.py` some modules or folders, `CHANGED=1 REST=1` the mutants of the
# functions changed since main (minutes), `SAMPLE=4` every 4th mutant, `AGAIN=1` the last
# survivors only, `AGAINST="tests/test_state.py"` other test files, `MUTMUT=1` mutmut's own
# run (every test that calls a function; hours).
MODULES ?=
AGAINST ?=
JOBS ?= 1
mutation: $(MUTATION_STAMP)
	$(BIN)/python scripts/mutation --jobs $(JOBS) $(if $(CHANGED),--changed) \
		$(if $(SAMPLE),--sample $(SAMPLE)) $(if $(AGAIN),--again) $(if $(REST),--rest) \
		$(if $(MUTMUT),--mutmut) $(foreach t,$(AGAINST),--against $(t)) $(MODULES)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info mutants
