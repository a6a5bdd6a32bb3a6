"""Zero-shot classification: a text classifier from class names and prompt templates.

Class c's weight is the mean of the normalised embeddings of its prompts (every template with
the class name in place of `{}`), renormalised: OpenAI CLIP's and OpenCLIP's recipe. An image's
score for a class is the fusion of its branches' cosines with that weight (fusion.py), and
top-1 / top-5 accuracy use the pessimistic tie rule of metrics.py.

The default class names (eval/data/imagenet_classnames.txt, 1000 lines in the order of the
ImageNet-1k class indices) and templates (eval/data/clip_templates.txt, the 80 OpenAI ImageNet
prompts) are those of open_clip's zero_shot_metadata.py (open-clip-torch 2.24.0, MIT licence,
eval/data/NOTICE), written one per line. Two names occur twice in that list ("missile" at
indices 657 and 744, "sunglasses" at 836 and 837, as in OpenAI's list): integer labels are
unaffected; a class *name* used as a label maps to its first occurrence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from train.model import HolisticCLIP
from train.tokenizer import Tokenizer

from .data import EvalError, EvalItem, EvalSet, read_lines
from .embed import EmbedOptions, embed_texts
from .fusion import Fusion, Scorer
from .metrics import ACCURACY_KS, ranks, recall_at_k

DATA_DIR = Path(__file__).parent / "data"
IMAGENET_CLASSNAMES = DATA_DIR / "imagenet_classnames.txt"
CLIP_TEMPLATES = DATA_DIR / "clip_templates.txt"
BLOCK_ELEMENTS = 1 << 24


def load_templates(path: str | Path | None) -> tuple[list[str], Path]:
    path = Path(path) if path else CLIP_TEMPLATES
    templates = read_lines(path, "templates")
    for number, template in enumerate(templates, 1):
        if "{}" not in template and "{c}" in template:  # CLIP_benchmark's placeholder
            templates[number - 1] = template = template.replace("{c}", "{}")
        if "{}" not in template:
            raise EvalError(f"{path}:{number}: template {template!r} has no '{{}}' (or '{{c}}') where the class "
                            "name goes")
    return templates, path


class LabelMap:
    """Class names and the rule that turns a sample's label into a class index.

    - WebDataset with integer labels: the label is an index into the class names (default: ImageNet's).
    - WebDataset with name labels: names of the class-name file; without one, the distinct labels
      found, sorted (known only after reading the set).
    - Image folder: folder names that are all class names map by name; otherwise, with as many
      names as folders, the i-th sorted folder is the i-th name (ImageFolder's rule, e.g. WordNet
      ids as folders and a file of readable names); without a file, the folder names themselves.
    """

    def __init__(self, eval_set: EvalSet, classnames_file: str | Path | None) -> None:
        self.source = Path(classnames_file) if classnames_file else None
        self.names: list[str] | None = read_lines(self.source, "class names") if self.source else None
        self.by_folder: dict[str, int] | None = None
        self.kind: str | None = None  # "index" or "name", fixed by the first label seen
        self.found: set[str] = set()
        if eval_set.kind == "folder":
            folders = eval_set.classes or []
            if self.names is None:
                self.names = [f.replace("_", " ") for f in folders]
                self.by_folder = {f: i for i, f in enumerate(folders)}
            elif all(f in self.names for f in folders):
                self.by_folder = {f: self.names.index(f) for f in folders}
            elif len(folders) == len(self.names):
                self.by_folder = {f: i for i, f in enumerate(folders)}
            else:
                raise EvalError(
                    f"{self.source}: {len(self.names)} class names for {len(folders)} class folders "
                    f"in {eval_set.path}, and the folder names are not class names; "
                    "give a file with one name per folder, in sorted folder order"
                )

    @property
    def file_label(self) -> str:
        if self.source:
            return str(self.source)
        if self.by_folder is not None:
            return "the folder names"
        return str(IMAGENET_CLASSNAMES) if self.kind == "index" else "the labels found"

    def check(self, item: EvalItem) -> None:
        """Fail on the first label the class names cannot explain (before the whole set is embedded)."""
        label = item.label
        if self.by_folder is not None:
            return
        kind = "index" if isinstance(label, int) else "name"
        if self.kind is None:
            self.kind = kind
            if kind == "index" and self.names is None:
                self.names = read_lines(IMAGENET_CLASSNAMES, "class names")
        elif kind != self.kind:
            raise EvalError(f"sample {item.key}: label {label!r} is a class {kind} "
                            f"but earlier labels are class {self.kind}s; use one kind of label in a dataset")
        if kind == "index":
            assert isinstance(label, int) and self.names is not None
            if not 0 <= label < len(self.names):
                raise EvalError(
                    f"{self.file_label}: sample {item.key} has label {label}, but the file lists "
                    f"{len(self.names)} class names (indices 0-{len(self.names) - 1}); "
                    "give this dataset's class names with --classnames FILE"
                )
        elif self.names is not None:
            if label not in self.names:
                raise EvalError(
                    f"{self.file_label}: sample {item.key} has label {label!r}, "
                    f"which is not one of its {len(self.names)} class names; "
                    "give this dataset's class names with --classnames FILE (one per line)"
                )
        else:
            self.found.add(str(label))

    def checked(self, items: Iterator[EvalItem]) -> Iterator[EvalItem]:
        for item in items:
            self.check(item)
            yield item

    def finish(self) -> list[str]:
        """The class names, once every label has been seen."""
        if self.names is None:
            self.names = sorted(self.found)
        return self.names

    def index(self, item: EvalItem) -> int:
        if self.by_folder is not None:
            return self.by_folder[str(item.label)]
        if isinstance(item.label, int):
            return item.label
        assert self.names is not None
        return self.names.index(str(item.label))  # first occurrence for a name listed twice


@torch.no_grad()
def build_classifier(model: HolisticCLIP, tokenizer: Tokenizer, classnames: Sequence[str], templates: Sequence[str],
                     options: EmbedOptions) -> torch.Tensor:
    """(classes, D): per class, the renormalised mean of its normalised prompt embeddings."""
    per_block = max(1, 2048 // len(templates))  # classes per text batch
    quiet = dataclasses.replace(options, progress=False)  # one bar for the classifier, not one per batch
    weights = []
    for start in tqdm(range(0, len(classnames), per_block), desc="classifier", unit="batch",
                      disable=not options.progress, dynamic_ncols=True):
        names = classnames[start:start + per_block]
        prompts = [t.replace("{}", name) for name in names for t in templates]
        emb = embed_texts(model, tokenizer, prompts, quiet).view(len(names), len(templates), -1)
        weights.append(F.normalize(emb.mean(dim=1), dim=-1))
    return torch.cat(weights)


def zeroshot_accuracy(image: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor, fusion: Fusion,
                      ks: Sequence[int] = ACCURACY_KS, device: str | torch.device = "cpu") -> dict[str, float]:
    """{"top1": .., "top5": ..}: image (N, H, D), classifier (C, D), labels (N,). Top-k for k >= C is left out."""
    scorer = Scorer(image, classifier, fusion, device=device)
    block = max(1, BLOCK_ELEMENTS // (len(scorer.branches) * len(classifier)))
    out = []
    for rows in torch.arange(len(image)).split(block):
        scores = scorer.scores(rows=rows.to(device))
        positives = torch.zeros_like(scores, dtype=torch.bool)
        positives[torch.arange(len(rows), device=scores.device), labels[rows].to(scores.device)] = True
        out.append(ranks(scores, positives).cpu())
    return {f"top{k}": v for k, v in recall_at_k(torch.cat(out), [k for k in ks if k < len(classifier)] or [1]).items()}
