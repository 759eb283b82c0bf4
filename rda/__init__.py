"""RDA (Reorganization Data Augmentation) and anchor-localization SFT data for ICL.

- :func:`generate_rda`: VQA -> aggregation -> decomposition -> rewriting for every training pair,
  adding ``diversity_captions`` to a dataset's annotation records (resumable, cached).
- :func:`make_anchor_sft` / :func:`write_llamafactory_dataset`: "Yes"/"No" anchor-localization
  records from a trained run's similarities and CCD clean labels, as a LLaMA-Factory dataset.

Command line: ``python -m rda generate ...`` and ``python -m rda sft ...`` (``--help``).
RDA talks to MLLMs only through ``utils.mllm`` and never imports ``processor/`` or ``solver/``.
"""
from .generate import generate_rda, run_rda, select_pairs
from .sft import anchor_record, make_anchor_sft, topk_indices, write_llamafactory_dataset

__all__ = ["anchor_record", "generate_rda", "make_anchor_sft", "run_rda", "select_pairs",
           "topk_indices", "write_llamafactory_dataset"]
