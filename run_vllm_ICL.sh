#!/usr/bin/env bash
# THI (test-time human-centred interaction) with the paper's settings: K = 5 rounds,
# lambda = 0.8, xi = 0.5 (0.55 with ICFG-PEDES as target), temperature 0.01, Qwen2-VL-7B +
# the ICL LoRA. Evaluates the run on the target first when its eval folder is missing.
#
#   bash run_vllm_ICL.sh --source CUHK-PEDES --target CUHK-PEDES --run runs/ICL_CUHK-PEDES_n0.0 \
#        --mllm pretrained/Qwen2-VL-7B-Instruct --lora pretrained/icl_lora --root data --gpus 0
#   bash run_vllm_ICL.sh ... --gpus 0,1                      # vLLM tensor parallel on 2 GPUs
#   bash run_vllm_ICL.sh ... --server http://localhost:8000/v1 --served-model icl
#                                                            # a running `vllm serve` (see docs/THI.md)
#   bash run_vllm_ICL.sh ... --simulated                     # SynthPEDES, no GPU, no model
#   bash run_vllm_ICL.sh ... -- --rounds 3 --out results/x   # anything after -- goes to python -m thi
#
# Results go to RUN/thi/TARGET/best/LABEL/, LABEL naming the backend and model (vllm-<model>[+<lora>],
# openai-<served model>, simulated): runs of different MLLMs never share a folder.
#
# Every setting below can also be given as an environment variable of the same name.
set -euo pipefail

# ---- settings (edit here or pass flags) -------------------------------------------------------
SOURCE=${SOURCE:-CUHK-PEDES}        # training set of the run (names the default run directory)
TARGET=${TARGET:-}                  # evaluation set; empty = SOURCE (cross-domain when different)
XI=${XI:-}                          # empty = 0.5, or 0.55 when TARGET is ICFG-PEDES
LAM=${LAM:-0.8}
ROUNDS=${ROUNDS:-5}
RUN_DIR=${RUN_DIR:-}                # empty = runs/ICL_${SOURCE}_n0.0 (what run_rde.sh writes)
MLLM=${MLLM:-pretrained/Qwen2-VL-7B-Instruct}
LORA=${LORA:-}                      # LoRA adapter dir for vLLM; empty = a merged model in MLLM
SERVER=${SERVER:-}                  # OpenAI-compatible URL; set -> the 'openai' backend
SERVED_MODEL=${SERVED_MODEL:-}      # model (or LoRA) name on the server
ROOT=${ROOT:-data}
GPUS=${GPUS:-0}                     # CUDA_VISIBLE_DEVICES; vLLM's tensor parallel size = count
BACKEND=${BACKEND:-}                # empty = openai with SERVER, else vllm
DEVICE=${DEVICE:-auto}              # device re-encoding refined queries
PY=${PYTHON:-python}

usage() { sed -n '2,17p' "$0"; exit "${1:-0}"; }
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --source) SOURCE=$2; shift 2 ;;
    --target) TARGET=$2; shift 2 ;;
    --xi) XI=$2; shift 2 ;;
    --lam|--lambda) LAM=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --run) RUN_DIR=$2; shift 2 ;;
    --mllm) MLLM=$2; shift 2 ;;
    --lora) LORA=$2; shift 2 ;;
    --server) SERVER=$2; shift 2 ;;
    --served-model) SERVED_MODEL=$2; shift 2 ;;
    --root) ROOT=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --simulated) BACKEND=simulated; shift ;;
    --backend) BACKEND=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "run_vllm_ICL.sh: unknown option $1" >&2; usage 2 ;;
  esac
done

TARGET=${TARGET:-$SOURCE}
RUN_DIR=${RUN_DIR:-runs/ICL_${SOURCE}_n0.0}
if [ -z "$XI" ]; then
  if [ "$TARGET" = "ICFG-PEDES" ]; then XI=0.55; else XI=0.5; fi
fi
if [ -z "$BACKEND" ]; then
  if [ -n "$SERVER" ]; then BACKEND=openai; else BACKEND=vllm; fi
fi
if [ ! -d "$RUN_DIR" ]; then
  echo "run directory $RUN_DIR not found: train one with run_rde.sh or pass --run" >&2; exit 2
fi
export CUDA_VISIBLE_DEVICES=$GPUS
TP=$(awk -F, '{print NF}' <<< "$GPUS")
[ "$TP" -ge 1 ] || TP=1

# The base similarity, ids and gallery features THI reads (best.pth's evaluation, current).
if ! $PY -m utils.run_dir eval-ready "$RUN_DIR" "$TARGET"; then
  echo "== evaluating $RUN_DIR on $TARGET (source $SOURCE)"
  $PY test.py "$RUN_DIR" --dataset "$TARGET" --root "$ROOT" --device "$DEVICE" --checkpoint best.pth
fi

ARGS=(--run "$RUN_DIR" --target "$TARGET" --root "$ROOT" --backend "$BACKEND"
      --lam "$LAM" --xi "$XI" --rounds "$ROUNDS" --device "$DEVICE")
case "$BACKEND" in
  vllm)
    ARGS+=(--model "$MLLM" --tensor-parallel-size "$TP")
    if [ -n "$LORA" ]; then ARGS+=(--lora "$LORA"); fi ;;
  openai)
    [ -n "$SERVER" ] || { echo "--backend openai needs --server URL" >&2; exit 2; }
    [ -n "$SERVED_MODEL" ] || { echo "--backend openai needs --served-model NAME" >&2; exit 2; }
    ARGS+=(--base-url "$SERVER" --served-model "$SERVED_MODEL") ;;
  transformers)
    ARGS+=(--model "$MLLM")
    if [ -n "$LORA" ]; then ARGS+=(--lora "$LORA"); fi ;;
  simulated) ;;
  *) echo "unknown backend $BACKEND (vllm, openai, transformers, simulated)" >&2; exit 2 ;;
esac

echo "== THI $SOURCE -> $TARGET: lambda=$LAM xi=$XI K=$ROUNDS backend=$BACKEND GPUs=$GPUS"
$PY -m thi "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
