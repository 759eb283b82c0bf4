"""The offline world: everything that lets the system run end to end without weights or data.

A guest of the real packages: it imports them, none of them imports it. The system reaches a
piece of it only by name, through a registry (the dataset ``SynthPEDES`` in ``datasets``, the
MLLM backend ``simulated`` in ``utils.mllm``).

- SynthPEDES, a generated benchmark in CUHK-PEDES's format with an attribute sidecar
  (``synthpedes``; its schema, renderer and caption grammar in ``synth_schema``,
  ``synth_render``, ``synth_text``), and SynthPEDES-pretrain, the corpus the tiny CLIP is
  pre-trained on (``synth_pretrain``);
- the tiny CLIP in OpenAI's checkpoint layout (``tiny_clip``) and its CLIP-style pre-training
  (``pretrain``);
- the simulated MLLM that answers ICL's prompts from the attribute sidecar (``simulated``);
- the tiny Qwen2-VL builders (``tiny_qwen2vl``: random; ``tiny_icl``: fine-tuned to answer like
  the simulated MLLM);
- THI's model-free similarity on SynthPEDES (``synthetic``).
"""
