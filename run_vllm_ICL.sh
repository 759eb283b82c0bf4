#!/usr/bin/env bash
# THI (test-time human-centred interaction) with the paper's settings: K = 5 rounds,
# lambda = 0.8, xi = 0.5 (0.55 with ICFG-PEDES as target), temperature 0.01, the LoRA-tuned
# Qwen2-VL-7B on GPUs 0,1 (vLLM tensor parallel 2): the release's setting, by default.
# Evaluates the run on the target first when its eval folder is missing.
#
#   bash run_vllm_ICL.sh --source CUHK-PEDES --run runs/ICL_CUHK-PEDES_n0.0 --root data
#        # base pretrained/Qwen2-VL-7B-Instruct + the ICL LoRA adapter pretrained/icl_lora, GPUs 0,1
#   bash run_vllm_ICL.sh ... --merged pretrained/Qwen2-VL-7B-ICL   # the LoRA merged in (the release's way)
#   bash run_vllm_ICL.sh ... --mllm DIR --lora DIR --gpus 0       # other folders, one GPU
#   bash run_vllm_ICL.sh ... --no-lora                       # base model without the LoRA: Table 6 #2 (ablation)
#   bash run_vllm_ICL.sh ... --server http://localhost:8000/v1 --served-model icl
#                                                            # a running `vllm serve` (see docs/THI.md)
#   bash run_vllm_ICL.sh ... --simulated                     # SynthPEDES, no GPU, no model
#   bash run_vllm_ICL.sh ... --dry-run                       # print the commands, run nothing
#   bash run_vllm_ICL.sh ... -- --rounds 3 --out results/x   # anything after -- goes to python -m thi
#
# Results go to RUN/thi/TARGET/LABEL/, LABEL naming the backend and model (vllm-<model>+<lora>,
# vllm-<merged model>+merged, vllm-<model>+nolora, openai-<served model>, simulated).
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
MLLM=${MLLM:-pretrained/Qwen2-VL-7B-Instruct}   # base model (with LORA) or the merged model (MERGED)
LORA=${LORA:-pretrained/icl_lora}   # the ICL LoRA adapter (huggingface.co/Yangsss/ICL, lora.tar.gz)
MERGED=${MERGED:-}                  # a folder with the LoRA merged in (LLaMA-Factory export): used instead
NO_LORA=${NO_LORA:-0}               # 1 = the base model without the LoRA (Table 6 #2 ablation)
SERVER=${SERVER:-}                  # OpenAI-compatible URL; set -> the 'openai' backend
SERVED_MODEL=${SERVED_MODEL:-}      # model (or LoRA) name on the server
ROOT=${ROOT:-data}
GPUS=${GPUS:-0,1}                   # CUDA_VISIBLE_DEVICES; vLLM's tensor parallel size = count
BACKEND=${BACKEND:-}                # empty = openai with SERVER, else vllm
DEVICE=${DEVICE:-auto}              # device re-encoding refined queries
DRY_RUN=${DRY_RUN:-0}               # 1 = print the commands only (no GPU, data or weights needed)
PY=${PYTHON:-python}

usage() { sed -n '2,21p' "$0"; exit "${1:-0}"; }
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
    --merged) MERGED=$2; shift 2 ;;
    --no-lora) NO_LORA=1; shift ;;
    --server) SERVER=$2; shift 2 ;;
    --served-model) SERVED_MODEL=$2; shift 2 ;;
    --root) ROOT=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --simulated) BACKEND=simulated; shift ;;
    --backend) BACKEND=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
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
if [ "$NO_LORA" = 1 ] && [ -n "$MERGED" ]; then
  echo "run_vllm_ICL.sh: --no-lora and --merged exclude each other" >&2; exit 2
fi
TP=$(awk -F, '{print NF}' <<< "$GPUS")
[ "$TP" -ge 1 ] || TP=1

# Which MLLM, said once: the printed plan, the results folder (LABEL) and THI's table name it.
TUNING=()
case "$BACKEND" in
  vllm|transformers)
    if [ "$NO_LORA" = 1 ]; then
      TUNING=(--no-lora); WHAT="$MLLM WITHOUT the ICL LoRA (--no-lora: Table 6 #2 ablation)"
    elif [ -n "$MERGED" ]; then
      MLLM=$MERGED; TUNING=(--merged); WHAT="$MERGED (the ICL LoRA merged in, the release's setting)"
    else
      TUNING=(--lora "$LORA"); WHAT="$MLLM + the ICL LoRA $LORA (served unmerged)"
    fi ;;
  openai)
    if [ "$NO_LORA" = 1 ]; then TUNING=(--no-lora); WHAT="server model $SERVED_MODEL WITHOUT the ICL LoRA (--no-lora)"
    else WHAT="server model $SERVED_MODEL (the server must serve the ICL LoRA, e.g. --served-model icl)"; fi ;;
  simulated) WHAT="simulated MLLM (SynthPEDES attribute table)" ;;
  *) echo "unknown backend $BACKEND (vllm, openai, transformers, simulated)" >&2; exit 2 ;;
esac

# Nothing is run (or checked on disk) in a dry run: print each command as it would run.
run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ "$DRY_RUN" != 1 ]; then
  if [ ! -d "$RUN_DIR" ]; then
    echo "run directory $RUN_DIR not found: train one with run_rde.sh or pass --run" >&2; exit 2
  fi
  case "$BACKEND" in
    vllm|transformers)
      if [ ! -d "$MLLM" ]; then
        echo "MLLM folder $MLLM not found: download Qwen/Qwen2-VL-7B-Instruct there (or pass --mllm DIR," \
             "or --merged DIR for the LoRA-merged model)" >&2; exit 2
      fi
      if [ "$NO_LORA" != 1 ] && [ -z "$MERGED" ] && [ ! -d "$LORA" ]; then
        echo "ICL LoRA adapter $LORA not found: unpack lora.tar.gz from huggingface.co/Yangsss/ICL there" \
             "(or pass --lora DIR; --merged DIR for a merged model; --no-lora runs the Table 6 #2 ablation" \
             "without it)" >&2; exit 2
      fi ;;
  esac
fi
export CUDA_VISIBLE_DEVICES=$GPUS
if [ "$DRY_RUN" = 1 ]; then echo "export CUDA_VISIBLE_DEVICES=$GPUS"; fi

# The base similarity, ids and gallery features THI reads.
if [ "$DRY_RUN" = 1 ] || [ ! -f "$RUN_DIR/eval/$TARGET/gallery_feats.npz" ]; then
  [ "$DRY_RUN" = 1 ] && echo "# when $RUN_DIR/eval/$TARGET/gallery_feats.npz is missing:"
  echo "== evaluating $RUN_DIR on $TARGET (source $SOURCE)"
  run $PY test.py "$RUN_DIR" --dataset "$TARGET" --root "$ROOT" --device "$DEVICE"
fi

ARGS=(--run "$RUN_DIR" --target "$TARGET" --root "$ROOT" --backend "$BACKEND"
      --lam "$LAM" --xi "$XI" --rounds "$ROUNDS" --device "$DEVICE")
case "$BACKEND" in
  vllm)
    ARGS+=(--model "$MLLM" --tensor-parallel-size "$TP" ${TUNING[@]+"${TUNING[@]}"}) ;;
  openai)
    if [ "$DRY_RUN" != 1 ]; then
      [ -n "$SERVER" ] || { echo "--backend openai needs --server URL" >&2; exit 2; }
      [ -n "$SERVED_MODEL" ] || { echo "--backend openai needs --served-model NAME" >&2; exit 2; }
    fi
    ARGS+=(--base-url "$SERVER" --served-model "$SERVED_MODEL" ${TUNING[@]+"${TUNING[@]}"}) ;;
  transformers)
    ARGS+=(--model "$MLLM" ${TUNING[@]+"${TUNING[@]}"}) ;;
  simulated) ;;
esac

echo "== THI $SOURCE -> $TARGET: lambda=$LAM xi=$XI K=$ROUNDS backend=$BACKEND GPUs=$GPUS (tensor parallel $TP)"
echo "== MLLM: $WHAT"
run $PY -m thi "${ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
