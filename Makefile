# outbox-relay. `make test` is the full check (CI runs it via .ci/run); it
# brings up PostgreSQL and RabbitMQ first and never passes -short, so every
# integration test runs.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

GO         ?= go
BIN        ?= bin/outbox-relay
IMAGE      ?= outbox-relay:local
BENCH_ARGS ?=

.PHONY: test sim sim-check mutants faults faults-only cluster-test cluster-only unit build demo bench fuzz lint docker

## test: services (scripts/test-env.sh), go vet, all tests with -race,
## the simulator's 10,000 seeds, the fault suite, then the cluster tests
test:
	. scripts/test-env.sh && \
	$(GO) vet ./... && \
	(cd bench && $(GO) vet ./... && $(GO) test -count=1 ./...) && \
	$(GO) test -race -count=1 -timeout 12m ./... && \
	$(MAKE) --no-print-directory sim-check && \
	$(MAKE) --no-print-directory faults-only && \
	$(MAKE) --no-print-directory cluster-only

SEEDS ?= 10000

## sim-check: the simulator (docs/simulation.md) without -race, which slows
## it tenfold; prints the seed count and time
sim-check:
	@out="$$($(GO) test -count=1 -timeout 10m -run '^TestSimulation' -v ./relay/ -seeds=$(SEEDS) 2>&1)" || \
		{ printf '%s\n' "$$out" | tail -150; exit 1; }; \
	printf '%s\n' "$$out" | grep -E '^sim:|same trace'

## sim: as many seeds as you ask, in parallel: make sim SEEDS=1000000
sim:
	$(GO) test -count=1 -timeout 0 -run '^TestSimulation$$' -v ./relay/ -seeds=$(SEEDS) | grep -vE '^(=== (RUN|PAUSE|CONT)|\s*--- PASS)'

## mutants: break the engine on purpose (relay/testdata/mutants) and say
## how many seeds the simulator took to notice each
mutants:
	bash scripts/mutants.sh

## faults: the fault-injection tests (they stop RabbitMQ and restart
## PostgreSQL, so they run alone, after everything else)
faults:
	. scripts/test-env.sh && $(MAKE) --no-print-directory faults-only

faults-only:
	$(GO) test -race -count=1 -p 1 -tags faults -timeout 15m -v ./faulttest/

## cluster-test: the cluster fault tests (faulttest/cluster_*_test.go) on
## scripts/cluster.sh's topology: three RabbitMQ nodes and a synchronous
## PostgreSQL pair. up, the tests, then always down; exits with the tests'
## status. Needs root; the shared services come from scripts/test-env.sh
cluster-test:
	. scripts/test-env.sh && $(MAKE) --no-print-directory cluster-only

cluster-only:
	status=0; \
	{ bash scripts/cluster.sh up && \
	  $(GO) test -race -count=1 -p 1 -tags faults,cluster -run '^TestCluster' -timeout 20m -v ./faulttest/; } || status=$$?; \
	bash scripts/cluster.sh down; \
	exit $$status

## unit: tests that need no services (integration tests skip under -short)
unit:
	$(GO) test -short ./...

## build: the binary in bin/
build:
	$(GO) build -o $(BIN) ./cmd/outbox-relay

## demo: end-to-end demo (scripts/demo.sh)
demo:
	bash scripts/demo.sh

## bench: throughput benchmark against the test services (its own module,
## bench/, so the relay's go.mod carries no plotting); BENCH_ARGS="..." passes flags
bench:
	. scripts/test-env.sh && \
	cd bench && $(GO) run . $(BENCH_ARGS)

## fuzz: fuzz the pgoutput decoder for 30s
fuzz:
	$(GO) test -run=x -fuzz=FuzzDecode -fuzztime=30s ./decoder/

## lint: gofmt and go vet
lint:
	@unformatted="$$(gofmt -l .)"; \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...

## docker: the container image
docker:
	docker build -t $(IMAGE) .
