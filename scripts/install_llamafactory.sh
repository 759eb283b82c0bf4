#!/usr/bin/env bash
# Create the LLaMA-Factory venv (default .venv-llamafactory) used for the anchor-localization
# LoRA SFT (docs/RDA_SFT.md). LLaMA-Factory caps transformers <= 5.6 and needs torchaudio, so it
# cannot share the project's venv (transformers 5.x newer) nor the vLLM venv (torch 2.13+cpu).
# Idempotent: when the pinned versions are already installed, pip is skipped and only the import
# check runs.
# usage: bash scripts/install_llamafactory.sh [VENV_DIR]
# env:   PYTHON (default python3); LLAMAFACTORY_VERSION, TORCH_VERSION, TORCHVISION_VERSION,
#        TORCHAUDIO_VERSION change the pins (only the defaults in requirements-llamafactory.txt
#        were verified).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-.venv-llamafactory}
LF_VERSION=${LLAMAFACTORY_VERSION:-0.9.5}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
TV_VERSION=${TORCHVISION_VERSION:-0.26.0}
TA_VERSION=${TORCHAUDIO_VERSION:-2.11.0}
log() { echo "[install_llamafactory] $*"; }
t0=$SECONDS

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV with $(${PYTHON:-python3} --version)"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Run python from a neutral folder: with the repository root as cwd, our top-level `datasets/`
# package would shadow Hugging Face `datasets`, which LLaMA-Factory imports.
NEUTRAL=$(mktemp -d)
trap 'rm -rf "$NEUTRAL"' EXIT
PY_ABS=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
LF_ABS=$(dirname "$PY_ABS")/llamafactory-cli

installed() {  # "name==version" lines, local tags such as +cu130 dropped
  (cd "$NEUTRAL" && "$PY_ABS" - <<'PYEOF'
import importlib.metadata as m
for d in ("llamafactory", "torch", "torchvision", "torchaudio"):
    try:
        print(f"{d}=={m.version(d).split('+')[0]}")
    except m.PackageNotFoundError:
        print(f"{d}==none")
PYEOF
  )
}
want=$(printf '%s\n' "llamafactory==$LF_VERSION" "torch==$TORCH_VERSION" \
  "torchvision==$TV_VERSION" "torchaudio==$TA_VERSION")

if [ "$(installed)" = "$want" ]; then
  log "llamafactory $LF_VERSION, torch $TORCH_VERSION, torchvision $TV_VERSION, torchaudio $TA_VERSION already installed: skipping pip"
else
  # The torch trio is pinned together: LLaMA-Factory imports torchaudio at start-up and PyPI's
  # newest torchaudio (2.11.0) is built for torch 2.11.0; unpinned, pip would pair it with a
  # newer torch.
  # With the default pins, every other package at the version CI tested (constraints file: pip
  # freeze of this venv); with changed pins, pip resolves the rest afresh.
  constraints=()
  if [ "$want" = "$(printf '%s\n' llamafactory==0.9.5 torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0)" ]; then
    constraints=(-c "$ROOT/constraints-llamafactory.txt")
  fi
  log "pip install llamafactory==$LF_VERSION torch==$TORCH_VERSION torchvision==$TV_VERSION torchaudio==$TA_VERSION ${constraints[*]}"
  t=$SECONDS
  "$PY_ABS" -m pip install -q "llamafactory==$LF_VERSION" "torch==$TORCH_VERSION" \
    "torchvision==$TV_VERSION" "torchaudio==$TA_VERSION" "${constraints[@]}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  [ "$(installed)" = "$want" ] || { log "pip install failed: have $(installed | tr '\n' ' ')"; exit 1; }
  log "pip install took $((SECONDS - t)) s"
fi

t=$SECONDS
(cd "$NEUTRAL" && "$PY_ABS" - <<'PYEOF'
import importlib.metadata as m
import torch, torchvision, torchaudio  # noqa: E401,F401
import llamafactory.data.mm_plugin  # noqa: F401  (imports torchaudio and av)
from llamafactory.hparams import get_train_args  # noqa: F401  (runs LLaMA-Factory's version check)
from transformers import Qwen2VLForConditionalGeneration  # noqa: F401
print("[install_llamafactory] imports OK:", ", ".join(f"{d} {m.version(d)}" for d in (
    "llamafactory", "torch", "torchvision", "torchaudio", "transformers", "peft", "accelerate",
    "datasets", "trl", "tokenizers")), "| cuda available:", torch.cuda.is_available())
PYEOF
)
(cd "$NEUTRAL" && "$LF_ABS" version >/dev/null) || { log "llamafactory-cli does not run"; exit 1; }
log "import check took $((SECONDS - t)) s"
log "venv $VENV ready ($(du -sh "$VENV" | cut -f1)) in $((SECONDS - t0)) s"
