#!/usr/bin/env bash
# Train ICL (RDE + RDA) or plain RDE with the releases' recipes, then evaluate the best checkpoint.
#
#   bash run_rde.sh DATA_ROOT DATASET [GPUS] [METHOD] [key=value ...]
#
# METHOD (4th word, or the METHOD environment variable; default icl):
#   icl  configs/icl_<dataset>.yaml: ICL release recipe, RDA required (anno_file=<RDA json>, or
#        <root>/<DATASET>/<annotation>.rda.json from `python -m rda generate`); refuses to start without it
#   rde  configs/rde_<dataset>.yaml: RDE release recipe, no RDA
#
#   bash run_rde.sh data CUHK-PEDES 2 icl anno_file=data/CUHK-PEDES/reid_raw.rda.json   # ICL, 2 GPUs
#   bash run_rde.sh data RSTPReid 1 rde noisy_rate=0.2                # RDE's noisy-correspondence setting
#   bash run_rde.sh data CUHK-PEDES 1 icl init_checkpoint=pre/best0.pth   # "+pre" (group 2 of Tables 1-2)
#   bash run_rde.sh data UFine6926 2 rde                              # text length 168 (its config)
# DATASET: CUHK-PEDES | ICFG-PEDES | RSTPReid | UFine6926 | SynthPEDES (configs/synthpedes_tiny.yaml)
# The OpenAI CLIP weights are read from pretrained/ViT-B-16.pt (override: pretrain_choice=PATH).
# The release differences each config sets (train_mode, ccd_loss_pass, ...): docs/DEVIATIONS.md.
set -euo pipefail
USAGE="usage: run_rde.sh DATA_ROOT DATASET [GPUS] [icl|rde] [key=value ...]"
ROOT=${1:?$USAGE}
DATASET=${2:?$USAGE}
GPUS=${3:-1}
shift $(( $# >= 3 ? 3 : 2 ))
METHOD=${METHOD:-icl}
if [ $# -ge 1 ] && [[ "$1" != *=* ]]; then
  METHOD=$1
  shift
fi
case "$METHOD" in
  icl|rde) ;;
  *) echo "unknown METHOD '$METHOD': icl (RDE + RDA, the ICL release's recipe) or rde (the RDE release's)"; exit 2 ;;
esac
PY=${PYTHON:-python}
case "$DATASET" in
  CUHK-PEDES) CFG=configs/${METHOD}_cuhk_pedes.yaml ;;
  ICFG-PEDES) CFG=configs/${METHOD}_icfg_pedes.yaml ;;
  RSTPReid)   CFG=configs/${METHOD}_rstpreid.yaml ;;
  UFine6926)  CFG=configs/${METHOD}_ufine6926.yaml ;;
  SynthPEDES) CFG=configs/synthpedes_tiny.yaml ;;
  *) echo "unknown dataset $DATASET (CUHK-PEDES, ICFG-PEDES, RSTPReid, UFine6926, SynthPEDES)"; exit 2 ;;
esac
NOISE=$(printf '%s\n' "$@" | sed -n 's/^noisy_rate=//p' | tail -n 1)
NOISE=${NOISE:-0.0}
NAME=$(echo "$METHOD" | tr '[:lower:]' '[:upper:]')_${DATASET}_n${NOISE}
ARGS=(--config "$CFG" "root_dir=$ROOT" "name=$NAME" "noisy_file=noiseindex/${DATASET}_${NOISE}.npy" "$@")
if [ "$GPUS" -gt 1 ]; then
  torchrun --standalone --nproc_per_node "$GPUS" train.py "${ARGS[@]}"
else
  $PY train.py "${ARGS[@]}"
fi
OUT=$($PY -c "import sys; from utils.config import load_config; c = load_config(sys.argv[1], sys.argv[2:]); print(c.output_dir)" "$CFG" "${@}")
$PY test.py "$OUT/$NAME" --root "$ROOT"
