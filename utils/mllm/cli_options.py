"""``build_client`` options from the MLLM flags that ``python -m thi``, ``python -m thi.app`` and
``python -m rda generate`` share (``--backend``, ``--model``, ``--lora``, ``--base-url``, ...)."""
from __future__ import annotations

import os
from typing import Optional

from . import default_dtype


def client_options(args, dataset_dir: Optional[str], cache_dir: str) -> dict:
    """The chosen backend's ``build_client`` options; a missing or bad flag stops naming it.

    ``dataset_dir`` (ROOT/DATASET, or None when unknown) holds the simulated backend's default
    ``attributes.json``. Flags a command lacks (``--device``, ``--dtype``, ``--micro-batch``)
    are read as unset."""
    def need(flag: str, value):
        if not value:
            raise SystemExit(f"--backend {args.backend} needs {flag}")
        return value

    if args.backend == "simulated":
        attributes = args.attributes
        if attributes is None:
            if dataset_dir is None:
                raise SystemExit("--backend simulated needs --attributes (or --root with "
                                 "ROOT/TARGET/attributes.json)")
            attributes = os.path.join(dataset_dir, "attributes.json")
        opts = {"attributes": attributes, "error_rate": args.error_rate, "seed": args.seed,
                "profile": getattr(args, "mllm_profile", None),
                "aggregation": getattr(args, "aggregation", "keep") or "keep"}
        if getattr(args, "text_length", None):
            opts["text_length"] = args.text_length
    elif args.backend == "openai":
        if args.concurrency < 1:
            raise SystemExit(f"--concurrency must be >= 1, got {args.concurrency}")
        opts = {"base_url": need("--base-url", args.base_url),
                "model": need("--served-model", args.served_model),
                "concurrency": args.concurrency}
    else:  # vllm, transformers: a local model folder
        opts = {"model": need("--model", args.model)}
        if args.backend == "vllm":
            opts["tensor_parallel_size"] = args.tensor_parallel_size
            if args.lora:
                opts["lora"] = args.lora
        else:
            if args.lora:
                opts["adapter"] = args.lora
            device = getattr(args, "device", None)
            if device not in (None, "", "auto"):
                opts["device"] = device
        if getattr(args, "release_sampling", False):
            opts["sample_low_temperature"] = True
        dtype = default_dtype(args.backend, getattr(args, "dtype", None))
        if dtype:
            opts["dtype"] = dtype
    opts["cache_dir"] = cache_dir
    if getattr(args, "micro_batch", None) is not None:
        if args.micro_batch < 1:
            raise SystemExit(f"--micro-batch must be >= 1, got {args.micro_batch}")
        opts["max_batch"] = args.micro_batch
    if getattr(args, "no_retry_unusable", False):
        opts["retry_unusable"] = False
    return opts
