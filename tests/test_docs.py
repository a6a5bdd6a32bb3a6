"""Every file, folder, section and module the repository cites exists in the repository.

Scanned: the Markdown documents (README.md, BENCHMARKS.md, docs/*.md) and the comments, docstrings
and strings of the project's source and config files. Cited are:

- paths under a top-level folder of the repository (`train/model.py`, `pipeline/caption/configs/`)
  and the root documents (`README.md`, `METHOD.md`): a path counts when it names a file (it has an
  extension) or a folder (it ends in `/`), so prose like "train/test" and TensorBoard tags like
  `train/lr` are not taken for paths. `<name>`, `{a,b}`, `{00000..00041}` and `*` are patterns: at
  least one file must match each alternative;
- `#section` anchors after a Markdown path (`docs/method.md#4-loss`), checked against the
  headings of that file as GitHub names them;
- Markdown links, relative to the file that holds them;
- modules run with `python -m X` or `--module X` when X is one of the project's packages.

Example paths of the user's own data (`runs/NAME`, `/data/cc3m`, `data/...`) are not under a
top-level folder of the repository and are not checked.
"""

from __future__ import annotations

import functools
import glob
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_manifests", "caption_prompts", "pipeline", "train", "eval", "demo")
FOLDERS = (*PACKAGES, "setup", "tests", "bench", "docs")
SKIP_DIRS = {"build", "runs", "demo_out", "__pycache__"}  # outputs; hidden folders are skipped too
SOURCE_SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".toml", ".md", ".txt", ".json"}

PATH = re.compile(
    r"(?<![\w./$~-])"  # not the tail of a longer path, a URL or a variable
    r"((?:" + "|".join(FOLDERS) + r")/[\w./{}*,<>-]*|[A-Z][A-Z_]*\.md|pyproject\.toml|Makefile)"
    r"(#[\w-]+)?"
)
MODULE = re.compile(r"(?:python -m|--module)\s+([A-Za-z_][\w.]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)\)")


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def source_files() -> list[Path]:
    out = []
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.is_file() and (path.suffix in SOURCE_SUFFIXES or path.name == "Makefile"):
            out.append(path)
    return out


def expand(pattern: str) -> list[str]:
    """Brace alternatives to separate patterns; a range or a single name in braces is a wildcard."""
    pattern = re.sub(r"<[^<>]*>", "*", pattern)
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    if "," not in m.group(1):
        return expand(head + "*" + tail)
    return list(itertools.chain.from_iterable(expand(head + alt + tail) for alt in m.group(1).split(",")))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> set[str]:
    out, seen, fenced = set(), {}, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*)", line)):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def cited_path_problem(path: str, anchor: str | None, relative_to: Path = ROOT) -> str | None:
    path = path.rstrip(".,:;")
    if not (path.endswith("/") or Path(path).suffix or path in ("Makefile",)):
        return None  # prose ("train/test") or a name that is not a file
    for pattern in expand(path):
        if not glob.glob(str(relative_to / pattern)):
            return f"{path}: no such file or folder in the repository"
    if anchor:
        target = relative_to / path
        if target.suffix != ".md":
            return None
        if anchor[1:] not in anchors(target):
            return f"{path}{anchor}: no such section (sections: {', '.join(sorted(anchors(target)))})"
    return None


def module_problem(name: str) -> str | None:
    name = name.rstrip(".")
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT / name.replace(".", "/")
    if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
        return None
    return f"python -m {name}: no such module"


def problems_in(path: Path) -> list[str]:
    out = []
    text = path.read_text(errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        found = [cited_path_problem(m.group(1), m.group(2)) for m in PATH.finditer(line)]
        found += [module_problem(m.group(1)) for m in MODULE.finditer(line)]
        if path.suffix == ".md":
            for m in LINK.finditer(line):
                target = m.group(1)
                if re.match(r"[a-z]+:", target):
                    continue  # http:, https:, mailto:
                file, _, anchor = target.partition("#")
                if file:
                    found.append(cited_path_problem(file, "#" + anchor if anchor else None, path.parent))
                elif anchor not in anchors(path):
                    found.append(f"#{anchor}: no such section in this file")
        rel = path.relative_to(ROOT)
        out += [f"{rel}:{number}: {p}" for p in found if p]
    return out


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_cite_what_exists(path):
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    assert problems_in(path) == []


def test_sources_cite_what_exists():
    docs = {*documents(), Path(__file__).resolve()}  # this file cites stale paths on purpose, below
    problems = [p for path in source_files() if path not in docs for p in problems_in(path)]
    assert problems == []


def test_the_checker_sees_stale_citations(tmp_path):
    # A check that finds nothing must be able to find something.
    assert cited_path_problem("pipeline/configs/tiny_cpu.yaml", None)
    assert cited_path_problem("METHOD.md", None)
    assert cited_path_problem("docs/method.md", "#no-such-section")
    assert module_problem("pipeline.demo")
    assert cited_path_problem("train/configs/vit_b16_{o2o,o2x}.yaml", None)
    assert cited_path_problem("train/test", None) is None
    assert cited_path_problem("caption_prompts/<name>.yaml", None) is None
    assert cited_path_problem("docs/method.md", "#4-loss") is None
    assert module_problem("demo.tiny_vlm") is None
    assert slug("Ψ_MLP: parallel MLP heads (`branch: mlp`)") == "ψ_mlp-parallel-mlp-heads-branch-mlp"
