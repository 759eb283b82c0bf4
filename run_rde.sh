#!/usr/bin/env bash
# Train RDE + RDA (ICL) with the paper's settings, then evaluate the best checkpoint.
#
#   bash run_rde.sh DATA_ROOT DATASET [GPUS] [key=value ...]
#   bash run_rde.sh data CUHK-PEDES 2                       # torchrun on 2 GPUs
#   bash run_rde.sh data RSTPReid 1 noisy_rate=0.2          # RDE's noisy-correspondence setting
#   bash run_rde.sh data UFine6926 2                        # text length 168, lr 5e-5 (its config)
#   bash run_rde.sh data CUHK-PEDES 1 anno_file=data/CUHK-PEDES/reid_raw.rda.json   # RDA captions
# DATASET: CUHK-PEDES | ICFG-PEDES | RSTPReid | UFine6926 | SynthPEDES
# The OpenAI CLIP weights are read from pretrained/ViT-B-16.pt (override: pretrain_choice=PATH).
set -euo pipefail
ROOT=${1:?usage: run_rde.sh DATA_ROOT DATASET [GPUS] [key=value ...]}
DATASET=${2:?usage: run_rde.sh DATA_ROOT DATASET [GPUS] [key=value ...]}
GPUS=${3:-1}
shift $(( $# >= 3 ? 3 : 2 ))
PY=${PYTHON:-python}
case "$DATASET" in
  CUHK-PEDES) CFG=configs/cuhk_pedes.yaml ;;
  ICFG-PEDES) CFG=configs/icfg_pedes.yaml ;;
  RSTPReid)   CFG=configs/rstpreid.yaml ;;
  UFine6926)  CFG=configs/ufine6926.yaml ;;
  SynthPEDES) CFG=configs/synthpedes_tiny.yaml ;;
  *) echo "unknown dataset $DATASET (CUHK-PEDES, ICFG-PEDES, RSTPReid, UFine6926, SynthPEDES)"; exit 2 ;;
esac
NOISE=$(printf '%s\n' "$@" | sed -n 's/^noisy_rate=//p' | tail -n 1)
NOISE=${NOISE:-0.0}
NAME=ICL_${DATASET}_n${NOISE}
ARGS=(--config "$CFG" "root_dir=$ROOT" "name=$NAME" "noisy_file=noiseindex/${DATASET}_${NOISE}.npy" "$@")
if [ "$GPUS" -gt 1 ]; then
  torchrun --standalone --nproc_per_node "$GPUS" train.py "${ARGS[@]}"
else
  $PY train.py "${ARGS[@]}"
fi
OUT=$($PY -c "import sys; from utils.config import load_config; c = load_config(sys.argv[1], sys.argv[2:]); print(c.output_dir)" "$CFG" "${@}")
$PY test.py "$OUT/$NAME" --root "$ROOT"
