"""The shell blocks of README.md and docs/*.md, for tests/test_docs.py (and for a quick look:
``python tests/doc_blocks.py`` lists every block and how it is treated).

Convention (docs writers): every ```bash block is executed by CI from the repository root after
`make demo` (work/data = SynthPEDES, work/pretrained/tiny_clip_synthpretrain.pt, work/runs/demo_synthpedes),
with the project venv first on PATH, unless the line right before its opening fence is

    <!-- not-run: REASON -->     never run (needs a GPU, the real CUHK-PEDES, Qwen2-VL-7B, ...)
    <!-- run: vllm -->           run with the vLLM venv (.venv-vllm) first on PATH instead

```sh and ```shell blocks follow the same rule, so a block cannot escape by its fence.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_FENCES = ("bash", "sh", "shell")
_NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->$")
_RUN_WITH = re.compile(r"^<!--\s*run:\s*(\S+)\s*-->$")
VENVS = {"vllm": ".venv-vllm"}


@dataclass(frozen=True)
class Block:
    path: str                # relative to the repository root
    line: int                # 1-based line of the opening fence
    code: str
    not_run: str | None      # the reason, when marked not-run ("" when marked without one)
    venv: str | None         # "vllm" when marked run: vllm

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def doc_files(root: str = ROOT) -> list[str]:
    """README.md and docs/*.md, relative to ``root``, in a stable order."""
    docs = os.path.join(root, "docs")
    names = sorted(f for f in os.listdir(docs) if f.endswith(".md")) if os.path.isdir(docs) else []
    return [p for p in ["README.md", *(f"docs/{n}" for n in names)] if os.path.isfile(os.path.join(root, p))]


def extract(path: str, root: str = ROOT) -> list[Block]:
    """The shell blocks of one markdown file; an unclosed fence is an error naming the line."""
    lines = open(os.path.join(root, path), encoding="utf-8").read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```") and fence[3:].strip().lower() in SHELL_FENCES:
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"{path}:{start + 1}: the ``` block opened here is never closed")
            prev = lines[start - 1].strip() if start else ""
            not_run = _NOT_RUN.match(prev)
            run_with = _RUN_WITH.match(prev)
            if run_with and run_with.group(1) not in VENVS:
                raise ValueError(f"{path}:{start + 1}: unknown '<!-- run: {run_with.group(1)} -->'; "
                                 f"valid: {', '.join(VENVS)}")
            blocks.append(Block(path, start + 1, "\n".join(body) + "\n",
                                not_run.group(1) if not_run else None,
                                run_with.group(1) if run_with else None))
        elif fence.startswith("```") and fence != "```":
            # another language: skip to its closing fence so its content is not parsed
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
        i += 1
    return blocks


def all_blocks(root: str = ROOT) -> list[Block]:
    return [b for path in doc_files(root) for b in extract(path, root)]


if __name__ == "__main__":
    for b in all_blocks():
        how = f"not run: {b.not_run}" if b.not_run is not None else f"RUN ({b.venv or 'main'} venv)"
        print(f"{b.id:28s} {how}")
    sys.exit(0)
