#!/usr/bin/env bash
# LoRA SFT (train) and merge (export) of Qwen2-VL for ICL's anchor localization, with LLaMA-Factory.
#
# usage: bash scripts/sft_lora.sh train  MODEL_DIR DATASET_DIR ADAPTER_DIR [key=value ...]
#        bash scripts/sft_lora.sh export MODEL_DIR ADAPTER_DIR MERGED_DIR  [key=value ...]
#   MODEL_DIR    base model folder (e.g. Qwen2-VL-7B-Instruct) or a hub id
#   DATASET_DIR  folder written by `python -m rda sft --out DATASET_DIR` (dataset_info.json)
#   key=value    any other LLaMA-Factory option, e.g. dataset=icl_anchor num_train_epochs=1
# env:   LF_VENV    LLaMA-Factory venv (default .venv-llamafactory, see scripts/install_llamafactory.sh)
#        TRAIN_YAML (default configs/llamafactory/qwen2vl_lora_sft.yaml; without a CUDA GPU
#                   the same recipe in float32: bf16=false is added, since bf16 needs a GPU)
#        EXPORT_YAML (default configs/llamafactory/qwen2vl_export.yaml)
#        the tiny CPU variants are configs/llamafactory/tiny_qwen2vl_{lora_sft,export}.yaml
#
# LLaMA-Factory runs with the dataset (train) or output (export) folder as its working directory
# and absolute paths only: with the repository root as cwd, our top-level `datasets/` package
# would shadow Hugging Face `datasets`.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 4 ] || usage
CMD=$1; shift

abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
# A path if it exists locally, otherwise the value as given (a hub id such as Qwen/Qwen2-VL-7B-Instruct).
model_ref() { if [ -e "$1" ]; then (cd "$1" && pwd); else echo "$1"; fi; }

LF_VENV=$(abspath "${LF_VENV:-$REPO/.venv-llamafactory}")
LF=$LF_VENV/bin/llamafactory-cli
[ -x "$LF" ] || { echo "sft_lora.sh: $LF not found; create the venv with: bash scripts/install_llamafactory.sh $LF_VENV" >&2; exit 1; }

# No trackers or analytics; a pedestrian-ReID SFT run has nothing to report online.
export WANDB_DISABLED=true WANDB_MODE=disabled GRADIO_ANALYTICS_ENABLED=False DO_NOT_TRACK=1
# LLaMA-Factory imports matplotlib; keep its font cache out of read-only homes.
export MPLCONFIGDIR=${MPLCONFIGDIR:-${TMPDIR:-/tmp}/mpl-$(id -u)}
# The repository must not be importable from LLaMA-Factory's interpreter.
unset PYTHONPATH

case $CMD in
  train)
    MODEL=$(model_ref "$1"); DATA=$(abspath "$2"); OUT=$(abspath "$3"); shift 3
    YAML=$(abspath "${TRAIN_YAML:-$REPO/configs/llamafactory/qwen2vl_lora_sft.yaml}")
    [ -f "$DATA/dataset_info.json" ] || { echo "sft_lora.sh: $DATA/dataset_info.json not found; write it with: python -m rda sft --run RUN --root DATA --out $DATA" >&2; exit 1; }
    CPU_ARGS=()
    # The paper's recipe trains in bf16, which LLaMA-Factory refuses without a GPU ("Your setup
    # doesn't support bf16/gpu"): on a machine without CUDA run the same recipe in float32 and
    # with single-process data loading. Options given after the paths still win.
    if ! "$LF_VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      echo "sft_lora.sh: no CUDA GPU: training in float32 on CPU (bf16=false preprocessing_num_workers=1 dataloader_num_workers=0)" >&2
      CPU_ARGS=(bf16=false preprocessing_num_workers=1 dataloader_num_workers=0)
    fi
    mkdir -p "$OUT"
    cd "$DATA"
    exec "$LF" train "$YAML" model_name_or_path="$MODEL" dataset_dir="$DATA" output_dir="$OUT" ${CPU_ARGS[@]+"${CPU_ARGS[@]}"} "$@"
    ;;
  export)
    MODEL=$(model_ref "$1"); ADAPTER=$(abspath "$2"); OUT=$(abspath "$3"); shift 3
    YAML=$(abspath "${EXPORT_YAML:-$REPO/configs/llamafactory/qwen2vl_export.yaml}")
    [ -f "$ADAPTER/adapter_config.json" ] || { echo "sft_lora.sh: $ADAPTER/adapter_config.json not found; train first (bash scripts/sft_lora.sh train ...)" >&2; exit 1; }
    mkdir -p "$OUT"
    cd "$OUT"
    exec "$LF" export "$YAML" model_name_or_path="$MODEL" adapter_name_or_path="$ADAPTER" export_dir="$OUT" "$@"
    ;;
  *) usage ;;
esac
