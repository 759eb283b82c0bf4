"""Gallery image paths: found under ``--root`` when the run was copied, shown relative to it.

``RUN/eval/DATASET/image_paths.json`` holds the absolute paths of the machine that evaluated
the run. On another machine (or with the data moved) ``--root`` says where the data is now:
a path under the run's saved ``root_dir`` is moved under ``--root``; failing that, a path
whose file is missing is cut at its dataset folder (``.../CUHK-PEDES/imgs/...``) and joined
to ``--root``; a relative path is joined to ``--root``."""
from __future__ import annotations

import os
from typing import Optional, Sequence


def relocate_image_paths(paths: Sequence[str], root: Optional[str], saved_root: Optional[str],
                         dataset_dir: str) -> tuple[list, Optional[str]]:
    """(paths resolved against ``root``, a line saying what moved, or None when nothing did)."""
    paths = [str(p) for p in paths]
    if not root or not paths:
        return paths, None
    root = os.path.abspath(root)
    if saved_root:
        old = os.path.abspath(saved_root).rstrip(os.sep) + os.sep
        if old != root.rstrip(os.sep) + os.sep and all(p.startswith(old) for p in paths):
            return ([os.path.join(root, p[len(old):]) for p in paths],
                    f"image paths moved from {old} to {root}")
    out, moved = [], 0
    marker = os.sep + dataset_dir + os.sep
    first_missing = not os.path.isfile(paths[0]) if os.path.isabs(paths[0]) else True
    for p in paths:
        if not os.path.isabs(p):
            out.append(os.path.join(root, p))
            moved += 1
        elif first_missing and marker in p:
            out.append(os.path.join(root, dataset_dir, p.rsplit(marker, 1)[1]))
            moved += 1
        else:
            out.append(p)
    return out, (f"{moved} image paths resolved against {root}" if moved else None)


def shown_path(path: str, root: Optional[str]) -> str:
    """``path`` relative to ``root`` (the data root) when under it, else its file name: the page
    and its exports never show where the server keeps its files."""
    if root:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        if not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
            return rel
    return os.path.basename(path)
