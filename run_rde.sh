#!/usr/bin/env bash
# Train ICL (RDE + RDA) or plain RDE with the releases' recipes, then evaluate the best checkpoint.
#
#   bash run_rde.sh DATA_ROOT DATASET [GPUS] [METHOD] [--pre DIR|FILE] [--dry-run] [key=value ...]
#
# METHOD (4th word, or the METHOD environment variable; default icl):
#   icl  configs/icl_<dataset>.yaml: ICL release recipe, RDA required (anno_file=<RDA json>, or
#        <root>/<DATASET>/<annotation>.rda.json from `python -m rda generate`); refuses to start without it
#   rde  configs/rde_<dataset>.yaml: RDE release recipe, no RDA
# --pre DIR|FILE  "+pre" (group 2 of Tables 1-2): start from MLLM4Text-ReID's pre-trained weights;
#        a folder holding best0/best1/best2.pth gets the release's choice per dataset (best0 CUHK-PEDES
#        and UFine6926, best1 ICFG-PEDES, best2 RSTPReid; utils/pre_checkpoints.py), a file is used as is.
#        The run is named <METHOD>_<DATASET>_n<rate>_pre-<file> (group 1: <METHOD>_<DATASET>_n<rate>).
# --dry-run  print the commands, run nothing (no GPU, data or weights needed)
#
#   bash run_rde.sh data CUHK-PEDES 2 icl anno_file=data/CUHK-PEDES/reid_raw.rda.json   # ICL, 2 GPUs
#   bash run_rde.sh data RSTPReid 1 rde noisy_rate=0.2                # RDE's noisy setting: noiseindex/RSTPReid_0.2.npy
#   bash run_rde.sh data CUHK-PEDES 1 icl --pre pretrained/           # "+pre" with pretrained/best0.pth
#   bash run_rde.sh data UFine6926 2 rde                              # text length 168 (its config)
# DATASET: CUHK-PEDES | ICFG-PEDES | RSTPReid | UFine6926 | SynthPEDES (configs/synthpedes_tiny.yaml)
# The OpenAI CLIP weights are read from pretrained/ViT-B-16.pt (override: pretrain_choice=PATH).
# Noisy runs read the release's noiseindex/<DATASET>_<rate>.npy (copy noiseindex/ from the RDE release).
# name=NAME trains into and evaluates <output_dir>/NAME.
# The release differences each config sets (train_mode, ccd_loss_pass, ...): docs/DEVIATIONS.md.
set -euo pipefail
USAGE="usage: run_rde.sh DATA_ROOT DATASET [GPUS] [icl|rde] [--pre DIR|FILE] [--dry-run] [key=value ...]"
DRY_RUN=${DRY_RUN:-0}
PRE=${PRE:-}
POS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --pre) PRE=${2:?--pre needs a folder or a file}; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) POS+=("$1"); shift ;;
  esac
done
set -- ${POS[@]+"${POS[@]}"}
ROOT=${1:?$USAGE}
DATASET=${2:?$USAGE}
GPUS=1
if [ $# -ge 3 ] && [[ "$3" =~ ^[0-9]+$ ]]; then GPUS=$3; shift 3; else shift 2; fi
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
last_value() { printf '%s\n' "${@:2}" | sed -n "s/^$1=//p" | tail -n 1; }
NOISE=$(last_value noisy_rate "$@")
NOISE=${NOISE:-0.0}
NAME=$(echo "$METHOD" | tr '[:lower:]' '[:upper:]')_${DATASET}_n${NOISE}
[ "$(last_value ccd "$@")" = false ] && NAME=${NAME}_noccd   # RDE Table 2 #7: its own folder
INIT_ARGS=()
if [ -n "$PRE" ]; then
  CHECK=(); [ "$DRY_RUN" = 1 ] && CHECK=(--no-check)
  RESOLVED=$($PY -m utils.pre_checkpoints "$PRE" "$DATASET" ${CHECK[@]+"${CHECK[@]}"}) || exit 2
  INIT=$(sed -n 1p <<< "$RESOLVED")
  NAME=${NAME}_$(sed -n 2p <<< "$RESOLVED")
  INIT_ARGS=("init_checkpoint=$INIT")
else
  INIT=$(last_value init_checkpoint "$@")
  if [ -n "$INIT" ]; then  # the init goes into the name: a "+pre" run never takes group 1's folder
    STEM=$(basename "$INIT"); NAME=${NAME}_pre-${STEM%.*}
  fi
fi
USER_NAME=$(last_value name "$@")
NAME=${USER_NAME:-$NAME}
NOISE_ARGS=()
if awk -v r="$NOISE" 'BEGIN { exit !(r + 0 > 0) }'; then  # the release's file for this rate
  NOISE_ARGS=("noisy_file=noiseindex/${DATASET}_${NOISE}.npy")
fi
ARGS=(--config "$CFG" "root_dir=$ROOT" "name=$NAME" ${NOISE_ARGS[@]+"${NOISE_ARGS[@]}"}
      ${INIT_ARGS[@]+"${INIT_ARGS[@]}"} "$@")
run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
echo "== $METHOD on $DATASET: $CFG, $GPUS GPU(s), noise $NOISE, init ${INIT:-CLIP (group 1)}, run $NAME"
if [ "$GPUS" -gt 1 ]; then
  run torchrun --standalone --nproc_per_node "$GPUS" train.py "${ARGS[@]}"
else
  run $PY train.py "${ARGS[@]}"
fi
OUT=$($PY -c "import sys; from utils.config import load_config; c = load_config(sys.argv[1], sys.argv[2:]); print(c.output_dir)" "$CFG" "${@}")
run $PY test.py "$OUT/$NAME" --root "$ROOT"
