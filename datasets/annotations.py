"""Shared reader logic for the text-to-image ReID benchmarks.

Every benchmark ships one JSON list of image records ``{"id", "<path field>", "captions",
"split", ...}``. A reader only says where the file and the images live and which field holds
the image path; loading, validation, split handling and pid numbering live here, so all
readers behave identically (and exactly as IRRA's / RDE's readers on the official files).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

from prettytable import PrettyTable

from utils.errors import InputFileError
from utils.images import ImageFileNotFound, image_problem
from utils.io import check_utf8, read_json

logger = logging.getLogger("ICL.datasets")

SPLITS = ("train", "val", "test")
# How many missing images an error lists before summarising the rest.
_MAX_REPORTED = 5

TrainItem = tuple[int, int, str, str]          # (pid, image_id, absolute image path, caption)
SubSentences = list[list[str]]                 # RDA: per caption, sub-sentences x alternatives


class AnnotationNotFound(InputFileError, FileNotFoundError):
    """A benchmark's annotation file is not where the reader looks."""


def _split_dict() -> dict[str, list]:
    return {"image_pids": [], "img_paths": [], "caption_pids": [], "captions": []}


class BaseDataset:
    """One benchmark's annotations, split into ``train`` / ``val`` / ``test``.

    Subclasses set ``name`` (also the folder under ``root``), ``anno_names`` (candidate
    annotation file names, first preferred), ``image_dir`` (folder the image paths are relative
    to, inside the dataset folder) and ``path_field`` (the record field holding that path).

    Attributes after construction:
      ``train``: list of ``(pid, image_id, img_path, caption)``; train pids are contiguous from 0
        (the official files number train ids 1.. (CUHK-PEDES) or 0.. (ICFG-PEDES, RSTPReid), which
        this maps exactly as IRRA does), image ids count train images in file order.
      ``train_rda``: None, or aligned with ``train``: per caption its sub-sentences, each a list
        of alternative strings (the sub-sentence and its rewrites), from ``diversity_captions``.
      ``val`` / ``test``: dicts ``image_pids, img_paths, caption_pids, captions`` (raw ids as pids).
      ``train_id_container`` / ``val_id_container`` / ``test_id_container``: sets of pids.
    """

    name: ClassVar[str] = ""
    anno_names: ClassVar[tuple[str, ...]] = ()
    image_dir: ClassVar[str] = "imgs"
    path_field: ClassVar[str] = "file_path"

    def __init__(self, root: str | os.PathLike = "data", anno_file: str | os.PathLike | None = None,
                 check_images: bool = True) -> None:
        self.dataset_dir = Path(root).expanduser().resolve() / self.name
        self.img_dir = self.dataset_dir / self.image_dir if self.image_dir else self.dataset_dir
        self.anno_path = self._resolve_anno_path(anno_file)
        records = load_records(self.anno_path, self.path_field)

        by_split: dict[str, list[tuple[int, dict]]] = {s: [] for s in SPLITS}
        for index, record in enumerate(records):
            by_split[record["split"]].append((index, record))
        self.num_images = {s: len(v) for s, v in by_split.items()}
        for split, items in by_split.items():
            self._check_duplicates(split, items)

        self.train, self.train_rda, self.train_id_container = self._build_train(by_split["train"])
        self.val, self.val_id_container = self._build_eval(by_split["val"])
        self.test, self.test_id_container = self._build_eval(by_split["test"])
        if check_images:
            self._check_images({self._image_path(r[self.path_field]): i for i, r in enumerate(records)})
        logger.info("%s loaded from %s\n%s", self.name, self.anno_path, self.summary())

    # ------------------------------------------------------------------ files
    def _resolve_anno_path(self, anno_file: str | os.PathLike | None) -> Path:
        if anno_file is not None:
            path = Path(anno_file).expanduser()
            if not path.is_file():
                raise AnnotationNotFound(
                    f"{self.name}: annotation file {path} (given as anno_file) does not exist; "
                    f"pass an existing JSON file or anno_file=None for {self.dataset_dir / self.anno_names[0]}")
            return path.resolve()
        for candidate in self.anno_names:
            if (self.dataset_dir / candidate).is_file():
                return self.dataset_dir / candidate
        expected = self.dataset_dir / self.anno_names[0]
        raise AnnotationNotFound(
            f"{self.name}: annotation file {expected} not found. Put the official {self.name} "
            f"annotation JSON there (a list of records with fields 'id', '{self.path_field}', "
            f"'captions', 'split'"
            + (f"; accepted names: {', '.join(self.anno_names)}" if len(self.anno_names) > 1 else "")
            + f") with the images under {self.img_dir}/, or pass anno_file=<path>.")

    def _image_path(self, relative: str) -> str:
        return str(self.img_dir / relative)

    # ------------------------------------------------------------------ splits
    def _build_train(self, items: list[tuple[int, dict]]
                     ) -> tuple[list[TrainItem], list[SubSentences] | None, set[int]]:
        raw_ids = sorted({int(record["id"]) for _, record in items})
        # Rank of the raw id: equals IRRA's numbering (id - 1 for CUHK-PEDES, id for ICFG/RSTP),
        # which IRRA asserts to be contiguous, and stays contiguous for any other file.
        pid_of = {raw: rank for rank, raw in enumerate(raw_ids)}
        if raw_ids and raw_ids[-1] - raw_ids[0] + 1 != len(raw_ids):
            logger.warning("%s: train ids in %s are not contiguous; renumbered 0..%d",
                           self.name, self.anno_path, len(raw_ids) - 1)
        has_rda = any("diversity_captions" in record for _, record in items)
        train: list[TrainItem] = []
        rda: list[SubSentences] = []
        missing_rda = 0
        for image_id, (index, record) in enumerate(items):
            for k, caption in enumerate(record["captions"]):
                if not caption.strip():
                    # An empty text would train as a real caption (SOT/EOT only) matched to this image.
                    raise _bad(self.anno_path, index, f"captions[{k}]",
                               "is empty in a train record; remove it (or the record) or write the caption")
            pid = pid_of[int(record["id"])]
            img_path = self._image_path(record[self.path_field])
            subs = record.get("diversity_captions")
            if has_rda and subs is None:
                missing_rda += 1
            for k, caption in enumerate(record["captions"]):
                train.append((pid, image_id, img_path, caption))
                if has_rda:
                    # A caption without sub-sentences augments to itself.
                    rda.append(subs[k] if subs is not None else [[caption]])
        if missing_rda:
            logger.warning("%s: %d of %d train records in %s have no 'diversity_captions'; their "
                           "captions are used unchanged as RDA views", self.name, missing_rda,
                           len(items), self.anno_path)
        return train, (rda if has_rda else None), set(pid_of.values())

    def _build_eval(self, items: list[tuple[int, dict]]) -> tuple[dict[str, list], set[int]]:
        split = _split_dict()
        for _, record in items:
            pid = int(record["id"])
            split["image_pids"].append(pid)
            split["img_paths"].append(self._image_path(record[self.path_field]))
            for caption in record["captions"]:
                split["caption_pids"].append(pid)
                split["captions"].append(caption)
        return split, set(split["image_pids"])

    def _check_duplicates(self, split: str, items: list[tuple[int, dict]]) -> None:
        """An image listed twice in an evaluation split enters the gallery twice (181 images for
        180, every metric moved): refused. In ``train`` it only weights that image's captions
        twice, which a derived file may intend: reported, not refused. The official files of
        the four benchmarks list each image once (as do IRRA's / RDE's readers, which keep
        every record)."""
        first: dict[str, int] = {}
        pairs: list[tuple[int, int, str]] = []
        for index, record in items:
            path = record[self.path_field]
            if path in first:
                pairs.append((first[path], index, path))
            else:
                first[path] = index
        if not pairs:
            return
        shown = "\n  ".join(f"records {a} and {b}: {p}" for a, b, p in pairs[:_MAX_REPORTED])
        more = f"\n  ... and {len(pairs) - _MAX_REPORTED} more" if len(pairs) > _MAX_REPORTED else ""
        message = (f"{self.anno_path}: {len(pairs)} image(s) listed twice in the '{split}' split "
                   f"(same '{self.path_field}'):\n  {shown}{more}")
        if split == "train":
            logger.warning("%s\nTheir captions are trained as listed (each copy is a separate image).", message)
            return
        raise InputFileError(message + "\nA gallery image listed twice is ranked twice and moves every "
                             "metric: remove the copies (or merge their captions into one record)")

    def _check_images(self, record_of: dict[str, int] | None = None) -> None:
        """Every referenced image exists and its header decodes (an empty or non-image file
        fails here, at start-up, not at the first batch that draws it)."""
        paths = sorted({p for _, _, p, _ in self.train} | set(self.val["img_paths"])
                       | set(self.test["img_paths"]))
        record_of = record_of or {}

        def listing(bad: list[str], why: dict[str, str] | None = None) -> str:
            shown = "\n  ".join(p + (f" (record {record_of[p]})" if p in record_of else "")
                                 + (f": {why[p]}" if why else "") for p in bad[:_MAX_REPORTED])
            more = f"\n  ... and {len(bad) - _MAX_REPORTED} more" if len(bad) > _MAX_REPORTED else ""
            return f"\n  {shown}{more}"

        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ImageFileNotFound(
                f"{self.name}: {len(missing)} of {len(paths)} images referenced by {self.anno_path} are "
                f"missing; expected them under {self.img_dir}/ (the '{self.path_field}' field is "
                f"relative to it):{listing(missing)}")
        problems = {p: why for p in paths if (why := image_problem(p)) is not None}
        if problems:
            bad = sorted(problems)
            raise InputFileError(
                f"{self.name}: {len(bad)} of {len(paths)} images referenced by {self.anno_path} cannot be "
                f"read:{listing(bad, problems)}\nRe-copy them from the dataset (or remove their records)")

    # ------------------------------------------------------------------ report
    def summary(self) -> str:
        """Statistics table: subset, ids, images, captions (as IRRA prints it)."""
        table = PrettyTable(["subset", "ids", "images", "captions"])
        table.add_row(["train", len(self.train_id_container), self.num_images["train"], len(self.train)])
        table.add_row(["val", len(self.val_id_container), self.num_images["val"], len(self.val["captions"])])
        table.add_row(["test", len(self.test_id_container), self.num_images["test"], len(self.test["captions"])])
        return str(table)

    def split(self, name: str) -> dict[str, list]:
        """The evaluation dict of ``val`` or ``test``."""
        if name not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {name!r}")
        return self.val if name == "val" else self.test

    def require_split(self, name: str, purpose: str) -> None:
        """Raise naming the annotation file unless split ``name`` has images and captions."""
        if name == "train":
            images, captions = self.num_images["train"], len(self.train)
        else:
            split = self.split(name)
            images, captions = len(split["img_paths"]), len(split["captions"])
        if images == 0 or captions == 0:
            present = ", ".join(f"{s} ({n} images)" for s, n in self.num_images.items() if n) or "none"
            raise ValueError(
                f"{self.anno_path}: the '{name}' split ({purpose}) is empty ({images} images, {captions} "
                f"captions); records with \"split\": \"{name}\" are needed. Splits present: {present}"
                + (". Evaluate on another split with val_dataset=val|test" if name != "train" else ""))


# ---------------------------------------------------------------------- validation
def load_records(path: Path, path_field: str) -> list[dict[str, Any]]:
    """Read and validate an annotation JSON list; errors name the file, record and field."""
    records = read_json(path, fix="expected a list of image records; restore the official file")
    if not isinstance(records, list):
        raise InputFileError(f"{path}: expected a JSON list of image records, got {type(records).__name__}")
    for index, record in enumerate(records):
        validate_record(record, index, path, path_field)
    return records


def _bad(path: Path, index: int, field: str, problem: str) -> InputFileError:
    return InputFileError(f"{path}: record {index}: field '{field}' {problem}")


def validate_record(record: Any, index: int, path: Path, path_field: str) -> None:
    """Check one record's fields (and normalise ``id`` / ``diversity_captions`` in place)."""
    if not isinstance(record, dict):
        raise InputFileError(f"{path}: record {index} is a {type(record).__name__}, expected an object "
                         f"with fields 'id', '{path_field}', 'captions', 'split'")
    for field in ("id", path_field, "captions", "split"):
        if field not in record:
            raise _bad(path, index, field, "is missing")
    pid = record["id"]
    if isinstance(pid, str) and pid.strip().lstrip("-").isdigit():
        record["id"] = pid = int(pid)
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise _bad(path, index, "id", f"must be an integer, got {pid!r}")
    if not isinstance(record[path_field], str) or not record[path_field]:
        raise _bad(path, index, path_field, f"must be a non-empty relative image path, got {record[path_field]!r}")
    if record["split"] not in SPLITS:
        raise _bad(path, index, "split", f"must be one of {', '.join(SPLITS)}, got {record['split']!r}")
    captions = record["captions"]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise _bad(path, index, "captions", "must be a list of strings")
    for field, text in [(path_field, record[path_field])] + [(f"captions[{k}]", c) for k, c in enumerate(captions)]:
        # A JSON escape such as \udcff decodes to a lone surrogate: it tokenizes, then crashes
        # every UTF-8 write of the text (eval/captions.json, the MLLM's prompts).
        if (problem := check_utf8(text)) is not None:
            raise _bad(path, index, field, problem + "; fix or remove the text (the file was probably "
                                                      "decoded with the wrong encoding when it was made)")
    if "diversity_captions" in record:
        record["diversity_captions"] = _normalise_rda(record["diversity_captions"], len(captions),
                                                      index, path)


def _normalise_rda(value: Any, num_captions: int, index: int, path: Path) -> list[SubSentences]:
    """``diversity_captions``: a list parallel to ``captions``; per caption a list of
    sub-sentences, each a list of alternative strings. A bare string stands for a one-element
    list at either level (ICL's files use both)."""
    field = "diversity_captions"
    if not isinstance(value, list) or len(value) != num_captions:
        raise _bad(path, index, field, f"must be a list with one entry per caption ({num_captions}), "
                                       f"got {type(value).__name__}"
                   + (f" of length {len(value)}" if isinstance(value, list) else ""))
    out: list[SubSentences] = []
    for k, subs in enumerate(value):
        if isinstance(subs, str):
            subs = [subs]
        if not isinstance(subs, list) or not subs:
            raise _bad(path, index, f"{field}[{k}]", "must be a non-empty list of sub-sentences")
        norm: SubSentences = []
        for j, alts in enumerate(subs):
            if isinstance(alts, str):
                alts = [alts]
            if (not isinstance(alts, list) or not alts
                    or not all(isinstance(a, str) for a in alts)):
                raise _bad(path, index, f"{field}[{k}][{j}]",
                           "must be a string or a non-empty list of strings (the sub-sentence and its rewrites)")
            for a in alts:
                if (problem := check_utf8(a)) is not None:
                    raise _bad(path, index, f"{field}[{k}][{j}]", problem + "; fix or remove the text")
            norm.append(list(alts))
        out.append(norm)
    return out

