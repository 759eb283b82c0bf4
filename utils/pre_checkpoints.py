"""Group 2 of Tables 1-2 ("+pre"): which ReID-domain pre-trained checkpoint each dataset starts from.

The ICL release (``train.py``, ``'+pre' in loss_names``) loads ``pretrained/<file>.pth`` from
MLLM4Text-ReID per dataset: ``best0`` for CUHK-PEDES and UFine6926, ``best1`` for ICFG-PEDES,
``best2`` for RSTPReid. Here the folder holding those files (or one file per dataset) is given
on the command line (``run_rde.sh --pre DIR``, ``python -m repro --pre-checkpoint DIR``).

    python -m utils.pre_checkpoints DIR_OR_FILE DATASET [--no-check]   # prints the file
"""
from __future__ import annotations

import os
import sys

# The release's mapping (ICL train.py, pre_dict).
PRE_CHECKPOINT_FILES: dict[str, str] = {
    "CUHK-PEDES": "best0.pth",
    "ICFG-PEDES": "best1.pth",
    "RSTPReid": "best2.pth",
    "UFine6926": "best0.pth",
}
PRE_SOURCE = "MLLM4Text-ReID's pre-trained weights (github.com/WentaoTan/MLLM4Text-ReID)"


def pre_checkpoint(path: str, dataset: str, check: bool = True) -> str:
    """The checkpoint ``dataset`` starts from: ``path/<best0|best1|best2>.pth`` when ``path`` is a
    folder (or ends with a separator), else ``path`` itself. With ``check``, a missing file is a
    FileNotFoundError naming it and the release's mapping."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        if dataset not in PRE_CHECKPOINT_FILES:
            raise ValueError(f"no pre-trained checkpoint is mapped for {dataset!r}: the release maps "
                             f"{PRE_CHECKPOINT_FILES}; pass the file itself instead of a folder")
        path = os.path.join(path, PRE_CHECKPOINT_FILES[dataset])
    if check and not os.path.isfile(path):
        raise FileNotFoundError(f"pre-trained checkpoint {path} not found: group 2 (+pre) starts {dataset} from "
                                f"{PRE_CHECKPOINT_FILES.get(dataset, '?')} of {PRE_SOURCE} (the release maps "
                                + ", ".join(f"{d} -> {f}" for d, f in PRE_CHECKPOINT_FILES.items()) + ")")
    return path


def pre_tag(path: str) -> str:
    """The init's part of a run name: ``pre-best0`` for ``.../best0.pth``."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return "pre-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--no-check" not in args
    args = [a for a in args if a != "--no-check"]
    if len(args) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    try:
        path = pre_checkpoint(args[0], args[1], check=check)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    print(pre_tag(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
