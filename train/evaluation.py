"""Evaluation during training: the config's held-out sets, scored at an interval and at the end.

The scoring is the eval stage's own command line (`python -m eval zeroshot|retrieval`), run in
one subprocess per evaluation point on an export of the checkpoint just saved. Why a subprocess:
data flows train -> eval, so the trainer may not import eval (tests/test_layout.py), and moving
the evaluation code under train/ would split one room in two. A subprocess costs a Python and
torch start (seconds) per evaluation point, and gives exactly the numbers and records
`python -m eval` gives on the same export: nothing to keep in step.

Rank 0 runs it while the other ranks wait at a barrier (a held-out set of a few thousand images
is embedded in seconds to a minute on one GPU; sharding it over ranks would need eval's code
here). The records are tagged `"training_eval": {"step", "set"}` and appended to
RUN/results.jsonl in one write per set; these tags are also what makes a resumed run neither
repeat nor lose an evaluation: a set whose records for a step are there is done.
TensorBoard gets, per set: zero-shot top-1/top-5 and retrieval R@1/5/10 both ways per text id,
per fusion and per single branch, and the retrieval set's branch x text-id heatmap as an image.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from train.config import EvalSection, RetrievalSet, ZeroshotSet

log = logging.getLogger("train")

RUN_EVAL = "import json, sys\nfrom eval.cli import main\nsys.exit(max([main(a) for a in json.loads(sys.argv[1])]))"


class Evaluation:
    """What to evaluate and when; `run` on rank 0 only."""

    def __init__(self, cfg: EvalSection, run_dir: Path, last_step: int, num_branches: int, device: str) -> None:
        self.cfg, self.run_dir, self.last_step = cfg, run_dir, last_step
        self.results = run_dir / "results.jsonl"
        self.device = cfg.device or device
        fusions = list(cfg.fusions or (["average", "each-branch"] if num_branches > 1 else ["average"]))
        self.fusions = fusions if num_branches > 1 else [f for f in fusions if f != "each-branch"] or ["average"]

    @property
    def needs_profile(self) -> bool:
        return "adaptive" in self.fusions

    def due(self, step: int) -> bool:
        if not self.cfg.sets or step == 0:
            return False
        every = self.cfg.every_steps
        return bool(every and step % every == 0) or (self.cfg.at_end and step == self.last_step)

    def pending(self, step: int) -> list[ZeroshotSet | RetrievalSet]:
        """The sets without records for this step in RUN/results.jsonl."""
        done = set()
        if self.results.exists():
            for line in self.results.read_text(encoding="utf-8").splitlines():
                try:
                    tag = json.loads(line).get("training_eval") or {}
                except (ValueError, AttributeError):
                    continue  # not ours to judge: `python -m eval compare` names a bad line
                if tag.get("step") == step:
                    done.add(tag.get("set"))
        return [s for s in self.cfg.sets if s.name not in done] if self.due(step) else []

    def run(self, step: int, export_dir: Path, writer) -> None:
        """Score the pending sets on `export_dir`; append their records; log them to `writer` (TensorBoard)."""
        sets = self.pending(step)
        if not sets:
            return
        out = self.run_dir / "eval" / f"step{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        commands = []
        for s in sets:
            (out / f"{s.name}.jsonl").unlink(missing_ok=True)  # what a killed attempt left
            commands.append(self._command(s, export_dir, out))
        done = subprocess.run([sys.executable, "-c", RUN_EVAL, json.dumps(commands)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                                  str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))})
        (out / "eval.log").write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0:
            log.error("eval at step %d failed (exit %d), training goes on; see %s: %s", step, done.returncode,
                      out / "eval.log", (done.stderr.strip().splitlines() or ["no output"])[-1])
        for s in sets:
            part = out / f"{s.name}.jsonl"
            if not part.exists():
                continue
            records = [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines() if line.strip()]
            for record in records:
                record["training_eval"] = {"step": step, "set": s.name}
            with open(self.results, "a", encoding="utf-8") as f:  # one write: a set is there whole or not at all
                f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
            if writer is not None:
                log_records(writer, s.name, records, step)
        log.info("eval at step %d: %s (%s)", step, ", ".join(s.name for s in sets), out)

    def _command(self, s: ZeroshotSet | RetrievalSet, export_dir: Path, out: Path) -> list[str]:
        c = self.cfg
        task = "zeroshot" if isinstance(s, ZeroshotSet) else "retrieval"
        argv = [task, "--checkpoint", str(export_dir), "--data", s.data, "--fusion", ",".join(self.fusions),
                "--out", str(out / s.name), "--results", str(out / f"{s.name}.jsonl"), "--device", self.device,
                "--batch-size", str(c.batch_size), "--precision", c.precision, "--no-progress"]
        if c.limit:
            argv += ["--limit", str(c.limit)]
        if isinstance(s, ZeroshotSet):
            argv += [*(["--classnames", s.classnames] if s.classnames else []),
                     *(["--templates", s.templates] if s.templates else [])]
        else:
            argv += ["--positives", s.positives, *(["--text-ids", *s.text_ids] if s.text_ids else [])]
        return argv


def scalars_of(name: str, records: list[dict[str, Any]]) -> dict[str, float]:
    """TensorBoard tags of one set's records: eval/<set>/<fusion>/top1, .../<text id>/t2i_R@1, ..."""
    out: dict[str, float] = {}
    for r in records:
        label, m = r["fusion"]["label"], r["metrics"]
        if r["task"] == "zeroshot":
            for b in m.get("per_branch", []):  # each branch alone, as eval labels it (average[m])
                out |= {f"eval/{name}/average[{b['branch']}]/{k}": b[k] for k in ("top1", "top5") if k in b}
            out |= {f"eval/{name}/{label}/{k}": m[k] for k in ("top1", "top5") if k in m}
        else:
            for text_id, v in m.items():
                for direction in ("i2t", "t2i"):
                    out |= {f"eval/{name}/{label}/{text_id}/{direction}_{k}": x for k, x in v[direction].items()}
    return out


def log_records(writer, name: str, records: list[dict[str, Any]], step: int) -> None:
    for tag, value in scalars_of(name, records).items():
        writer.add_scalar(tag, value, step)
    heatmaps = {r["branch_analysis"]["heatmap"] for r in records if r.get("branch_analysis", {}).get("heatmap")}
    for path in sorted(heatmaps):
        if Path(path).is_file():
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                writer.add_image(f"eval/{name}/branch_heatmap", np.asarray(image.convert("RGB")), step,
                                 dataformats="HWC")
    writer.flush()
