"""Evaluation sets: where images, their texts and their labels come from.

- Retrieval: a dataset in the project's format (docs/data-format.md), read through
  data_manifests (manifest + ShardReader). Every text id of a sample is one caption of its image.
- CLIP_benchmark's WebDataset benchmark layout (`clip_benchmark_export_wds`), for both tasks:
  DIR/<split>/nshards.txt and DIR/<split>/{0..n-1}.tar, with `classnames.txt`,
  `zeroshot_classification_templates.txt` and `dataset_type.txt` in DIR. A retrieval sample is
  an image and a `.txt` with one caption per line (read as text ids c0, c1, ...); a
  classification sample an image and a `.cls` class index.
- Zero-shot: labelled images, either
  - WebDataset shards whose samples carry a label: a `<key>.cls` (or `.label`, `.class`) member,
    or a "label" / "class" / "cls" / "target" field in `<key>.json` (at the top level or under
    "source", where ingest keeps the URL list's extra columns). A label is a class index
    (an integer) or a class name; or
  - an image folder per class, DIR/<class>/<image> (torchvision's ImageFolder layout): classes
    are the sorted folder names.

Samples are streamed one at a time: only the caller decides what to keep (the embeddings).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_manifests import (
    COMPLETE,
    ManifestError,
    Problem,
    ShardReader,
    ShardReadError,
    TarReader,
    list_shard_files,
    load_manifest,
)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
IMAGE_FILES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LABEL_MEMBERS = ("cls", "label", "class")
LABEL_FIELDS = ("label", "class", "cls", "target")


class EvalError(Exception):
    """An evaluation input that cannot be used (the message names the file and the fix)."""


@dataclass
class EvalItem:
    """One image of an evaluation set. `image` is encoded bytes or a file path, dropped after embedding."""

    key: str
    image: bytes | Path | None
    texts: dict[str, str] = field(default_factory=dict)
    label: int | str | None = None


@dataclass
class EvalSet:
    """An evaluation set: how to stream it and what is known before reading it."""

    path: Path
    kind: str  # "shards" (project format), "webdataset" (labelled tars), "folder" (image folder per class)
    dataset_id: str | None  # the manifest's id; None without a manifest
    expected: int | None  # samples announced by the manifest or the folder listing (progress bars)
    text_ids: list[str]  # text ids the manifest describes (retrieval)
    classes: list[str] | None = None  # folder names (image folder)
    classnames_file: Path | None = None  # the set's own class names and templates (CLIP_benchmark layout)
    templates_file: Path | None = None
    reader: Callable[[EvalSet], Iterator[EvalItem]] | None = None
    problems: list[str] = field(default_factory=list)  # why samples were skipped (one line per bad member)
    skipped: int = 0  # samples skipped (one sample can have several problems)

    def __iter__(self) -> Iterator[EvalItem]:
        assert self.reader is not None
        return self.reader(self)

    def describe(self) -> dict:
        return {"path": str(self.path.resolve()), "kind": self.kind, "dataset_id": self.dataset_id}


# ----------------------------------------------------------------------------- CLIP_benchmark's layout


@dataclass
class BenchmarkLayout:
    """A dataset in CLIP_benchmark's WebDataset layout: DIR/<split>/{0..n-1}.tar plus side files in DIR."""

    root: Path
    split_dir: Path
    shards: list[str]
    dataset_type: str  # "classification" (CLIP_benchmark's default), "retrieval", "multilabel"

    def side_file(self, name: str) -> Path | None:
        return self.root / name if (self.root / name).is_file() else None


def clip_benchmark_layout(path: str | Path, split: str = "test") -> BenchmarkLayout | None:
    """The layout when `path` is such a dataset (its root, or the split directory itself), else None."""
    path = Path(path)
    if (path / split / "nshards.txt").is_file():
        root, split_dir = path, path / split
    elif (path / "nshards.txt").is_file():
        root, split_dir = path.parent, path
    else:
        return None
    counted = split_dir / "nshards.txt"
    text = counted.read_text(encoding="utf-8", errors="replace").strip()
    if not text.isdecimal() or int(text) < 1:
        raise EvalError(f"{counted}: expected the number of shards, found {text[:40]!r}")
    shards = [f"{i}.tar" for i in range(int(text))]
    missing = [s for s in shards if not (split_dir / s).is_file()]
    if missing:
        raise EvalError(f"{split_dir}: nshards.txt says {len(shards)} shards but {', '.join(missing[:3])} "
                        "is not there; complete the download of the benchmark")
    kind = root / "dataset_type.txt"
    dataset_type = kind.read_text(encoding="utf-8").strip().lower() if kind.is_file() else "classification"
    return BenchmarkLayout(root, split_dir, shards, dataset_type)


def _benchmark_retrieval_set(layout: BenchmarkLayout) -> EvalSet:
    if layout.dataset_type != "retrieval":
        raise EvalError(f"{layout.root}: a CLIP_benchmark {layout.dataset_type} set (dataset_type.txt); "
                        "retrieval needs dataset_type.txt saying 'retrieval'; use `python -m eval zeroshot`")

    def read(es: EvalSet) -> Iterator[EvalItem]:
        for name in layout.shards:
            reader = TarReader(layout.split_dir / name)
            try:
                for key, members in reader:
                    image = next((members[ext] for ext in IMAGE_MEMBERS if ext in members), None)
                    if image is None or "txt" not in members:
                        es.problems.append(str(Problem(name, key, "no image member or no .txt")))
                        es.skipped += 1
                        continue
                    # As CLIP_benchmark reads it: str.splitlines, one caption per line.
                    captions = members["txt"].decode("utf-8", errors="replace").splitlines()
                    yield EvalItem(key, image, {f"c{i}": c for i, c in enumerate(captions)})
            except ShardReadError as e:
                raise EvalError(f"{layout.split_dir / name}: cannot be read ({e.reason})") from None
            finally:
                es.problems.extend(str(p) for p in reader.problems)
                es.skipped += sum(reader.refused.values())

    return EvalSet(layout.split_dir, "clip_benchmark", f"wds/{layout.root.name}/{layout.split_dir.name}", None, [],
                   reader=read)


# ----------------------------------------------------------------------------- retrieval


def open_retrieval_set(path: str | Path, split: str = "test") -> EvalSet:
    """A multi-text dataset in the project's format (its complete shards, in name order), or a
    retrieval set in CLIP_benchmark's layout."""
    root = Path(path)
    layout = clip_benchmark_layout(root, split) if root.is_dir() else None
    if layout is not None:
        return _benchmark_retrieval_set(layout)
    if not root.is_dir():
        raise EvalError(f"{root}: no such directory; --data takes a dataset directory (shards + manifest.json)")
    try:
        manifest = load_manifest(root)
    except ManifestError as e:
        hint = ("; for shards without one, run `holiclip-manifest index DIR`"
                if not (root / "manifest.json").exists() else "")
        raise EvalError(f"{e}{hint}") from None
    shards = [s for name, s in sorted(manifest.shards.items()) if s.status == COMPLETE]
    missing = [s.name for s in shards if not (root / s.name).is_file()]
    if missing:
        raise EvalError(f"{root}: the manifest lists shards that are not there ({', '.join(missing[:3])}); "
                        "check the copy with `holiclip-manifest verify DIR`")
    names = [s.name for s in shards]

    def read(es: EvalSet) -> Iterator[EvalItem]:
        for name in names:
            reader = ShardReader(root / name)
            try:
                for sample in reader:
                    yield EvalItem(sample.key, sample.image, dict(sample.texts))
            except ShardReadError as e:
                raise EvalError(f"{root / name}: {e.reason}; "
                                f"check the dataset with `holiclip-manifest verify {root}`") from None
            es.problems.extend(str(p) for p in reader.problems)
            es.skipped += sum(reader.refused.values())

    return EvalSet(root, "shards", manifest.dataset_id, sum(s.samples for s in shards), list(manifest.texts),
                   reader=read)


# ----------------------------------------------------------------------------- classification


def open_classification_set(path: str | Path, split: str = "test") -> EvalSet:
    """Labelled WebDataset shards (with or without a manifest; CLIP_benchmark's layout with its
    class names and templates) or an image folder per class."""
    root = Path(path)
    if not root.is_dir():
        raise EvalError(f"{root}: no such directory; --data takes a directory of .tar shards or of class folders")
    layout = clip_benchmark_layout(root, split)
    if layout is not None:
        if layout.dataset_type != "classification":
            raise EvalError(f"{layout.root}: a CLIP_benchmark {layout.dataset_type} set (dataset_type.txt); "
                            "zero-shot reads classification sets" + ("; use `python -m eval retrieval`"
                                                                     if layout.dataset_type == "retrieval" else ""))
        return EvalSet(layout.split_dir, "clip_benchmark", f"wds/{layout.root.name}/{layout.split_dir.name}", None,
                       [], classnames_file=layout.side_file("classnames.txt"),
                       templates_file=layout.side_file("zeroshot_classification_templates.txt"),
                       reader=lambda es: _read_labelled_shards(es, layout.shards))
    shards = list_shard_files(root)
    if shards:
        dataset_id, expected = None, None
        if (root / "manifest.json").exists():
            try:
                manifest = load_manifest(root)
            except ManifestError as e:
                raise EvalError(str(e)) from None
            complete = {s.name: s.samples for s in manifest.shards.values() if s.status == COMPLETE}
            shards = [s for s in shards if s in complete]
            dataset_id, expected = manifest.dataset_id, sum(complete[s] for s in shards)
        return EvalSet(root, "webdataset", dataset_id, expected, [],
                       reader=lambda es: _read_labelled_shards(es, shards))

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {c: sorted(p for p in (root / c).iterdir()
                       if p.suffix.lower() in IMAGE_FILES and not p.name.startswith("."))
             for c in classes}
    classes = [c for c in classes if files[c]]
    if not classes:
        raise EvalError(f"{root}: no .tar shards and no class folders with images (DIR/<class>/<image>.jpg) here")

    def read(es: EvalSet) -> Iterator[EvalItem]:
        for c in classes:
            for p in files[c]:
                yield EvalItem(f"{c}/{p.name}", p, label=c)

    return EvalSet(root, "folder", None, sum(len(f) for f in files.values()), [], classes=classes, reader=read)


def _read_labelled_shards(es: EvalSet, shards: list[str]) -> Iterator[EvalItem]:
    for name in shards:
        path = es.path / name
        reader = TarReader(path)
        try:
            for key, members in reader:
                item = _labelled_item(key, members)
                if isinstance(item, str):
                    es.problems.append(str(Problem(name, key, item)))
                    es.skipped += 1
                else:
                    yield item
        except ShardReadError as e:
            raise EvalError(f"{path}: cannot be read ({e.reason}); check the shard (`tar tf {path}`)") from None
        finally:
            es.problems.extend(str(p) for p in reader.problems)  # samples the tar reader refused
            es.skipped += sum(reader.refused.values())


def _labelled_item(key: str, raw: dict[str, bytes]) -> EvalItem | str:
    """An EvalItem from a WebDataset sample {ext: bytes}, or the reason it cannot be used."""
    image = next((raw[ext] for ext in IMAGE_MEMBERS if ext in raw), None)
    if image is None:
        return f"no image member ({', '.join('.' + e for e in IMAGE_MEMBERS)})"
    label: object = None
    for ext in LABEL_MEMBERS:
        if ext in raw:
            label = raw[ext].decode("utf-8", errors="replace").strip()
            break
    record: dict = {}
    if "json" in raw:
        try:
            record = json.loads(raw["json"])
        except (ValueError, RecursionError):  # not UTF-8 or not JSON; a 4300-digit number; deep nesting
            return ".json is not valid JSON"
        if not isinstance(record, dict):
            record = {}
    if label is None:
        for where in (record, record.get("source") if isinstance(record.get("source"), dict) else {}):
            label = next((where[f] for f in LABEL_FIELDS if f in where), None)
            if label is not None:
                break
    if label is None:
        return f"no label (a .cls member or a {'/'.join(LABEL_FIELDS)} field in the .json)"
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        return f"label {label!r} is neither a class index nor a class name"
    if isinstance(label, str) and label.lstrip("-").isdecimal() and len(label) < 20:  # what int() reads
        label = int(label)
    texts = record.get("texts") if isinstance(record.get("texts"), dict) else {}
    return EvalItem(key, image, texts, label)


# ----------------------------------------------------------------------------- side files


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty lines of a text file; an empty line in the middle is an error (it would shift indices)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvalError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: cannot read the {what} file ({e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise EvalError(f"{path}:{number}: empty line; a {what} file holds one entry per line")
    if not lines:
        raise EvalError(f"{path}: the {what} file is empty")
    return [line.strip() for line in lines]
