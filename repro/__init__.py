"""Reproduce the paper: one sub-command per table and figure (``python -m repro --help``).

The package only orchestrates ``train.py``, ``test.py`` and ``python -m thi`` (as subprocesses)
and reads the run directories they write; a finished run directory is never recomputed. Each
sub-command writes a markdown table (ours | paper | difference), CSV and JSON, and a PNG per
figure. ``--world real`` runs on the real benchmarks with Qwen2-VL; ``--world mini`` runs the
mini paper on SynthPEDES with the tiny pre-trained CLIP and the simulated MLLM
(``configs/repro_mini.yaml``).
"""
