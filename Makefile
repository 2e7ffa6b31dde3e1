# Edgefleet. `make run` builds everything and runs a demo fleet; `make test`
# runs every test. Both need only Go; `make proto` also needs protoc.

GO       ?= go
BIN      := bin
VERSION  ?= 0.1.0-dev
LDFLAGS  := -s -w -X github.com/edgefleet/edgefleet/agent.Version=$(VERSION)
MODELS   := models/examples/build

.PHONY: all build models run test test-short bench fuzz fuzz-ci proto fmt vet clean

all: build models

## build: static binaries of fleet-controller, fleet-agent and fleet in bin/; fleet-agent with the
## flags of scripts/internal/agentbuild (the one place they live: bench and e2e use it too)
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./controller/cmd/fleet-controller ./fleet/cmd/fleet
	$(GO) run ./scripts/agentbuild -o $(BIN)/fleet-agent -X github.com/edgefleet/edgefleet/agent.Version=$(VERSION)

## models: the example model bundles, built from source, in models/examples/build
models:
	$(GO) run ./scripts/buildmodels -out $(MODELS)

## run: a controller with its embedded broker, three agents, the example model assigned, live status
run: build models
	$(GO) run ./scripts/demo -bin $(BIN) -models $(MODELS) -data data

## test: vet, then every test with the race detector
test:
	$(GO) vet ./...
	$(GO) test -race -timeout 15m ./...

## test-short: the unit tests only, no end-to-end runs
test-short:
	$(GO) test -short ./...

## bench: the end-to-end benchmarks (a rollout to 10,000 simulated devices on the embedded broker and
## Mosquitto, telemetry ingest against raw QoS 1 delivery, the agent's footprint) and every Go
## benchmark; writes the tables into BENCHMARKS.md. BENCH_FLAGS passes flags (go run ./scripts/bench -h),
## e.g. BENCH_FLAGS='-only go' for the Go benchmarks alone
bench: models
	$(GO) run ./scripts/bench -out BENCHMARKS.md $(BENCH_FLAGS)

## fuzz: every fuzz target for FUZZTIME (default 3s) each
fuzz:
	bash scripts/fuzz.sh

## fuzz-ci: every fuzz target for a fixed number of executions each (FUZZEXECS, default 2000), as CI runs
## it: a count, not a duration, which races Go's fuzz coordinator (see scripts/fuzz.sh)
FUZZEXECS ?= 2000
fuzz-ci:
	FUZZTIME=$(FUZZEXECS)x bash scripts/fuzz.sh

## proto: regenerate proto/edgefleetv1 with Debian's protoc and the protoc-gen-go pinned in go.mod
proto:
	@command -v protoc >/dev/null || { echo "protoc not found: apt-get install -y protobuf-compiler"; exit 1; }
	$(GO) build -o $(BIN)/protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go
	protoc --plugin=protoc-gen-go=$(BIN)/protoc-gen-go --go_out=. --go_opt=module=github.com/edgefleet/edgefleet -I proto proto/edgefleetv1/edgefleet.proto

fmt:
	gofmt -w $$(git ls-files '*.go' | grep -v '\.pb\.go$$')

vet:
	$(GO) vet ./...

clean:
	rm -rf $(BIN) $(MODELS)
