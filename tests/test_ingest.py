"""Ingest, run as a user runs it: `python -m pipeline.ingest` driving the real img2dataset against a
real HTTP server on 127.0.0.1 (tests/http_server.py), `ray job submit` on a real Ray head, and
SIGKILL to the whole process group at chosen points before resuming.

Nothing is faked. Kill points are reached by watching state (a request the server is holding,
files appearing) or by the ingest's own fault-injection switch (HOLICLIP_INGEST_CRASH), which
kills the process group with SIGKILL exactly where named; never by sleeping.
"""

from __future__ import annotations

import csv
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import snapshot, write_raw_tar
from http_server import BAD_KINDS, ImageServer
from PIL import Image

from data_manifests import COMPLETE, ShardReader, load_manifest
from data_manifests.verify import verify_dataset
from pipeline.ingest.cli import main
from pipeline.ingest.converter import reason_of

ROOT = Path(__file__).resolve().parents[1]
MANIFEST_CLI = str(Path(sys.executable).with_name("holiclip-manifest"))
# Small and quick on a 2-core machine; the huge test image (1500x1000) is over this area.
COMMON = ["--threads", "16", "--timeout", "5", "--max-image-area", "1e6", "--no-progress"]

# What each bad URL must be recorded with, per sample (img2dataset's error_message, or ours).
EXPECTED_ERROR = {
    "http_404": r"HTTP Error 404",
    "http_500": r"HTTP Error 500",
    "dropped": r"Remote end closed connection without response|Connection reset by peer",
    "cut_short": r"IncompleteRead",
    "html": r"Image decoding error",
    "truncated_jpeg": r"Image decoding error",
    "corrupt": r"Image decoding error",
    "huge": r"CV_IO_MAX_IMAGE_PIXELS|image area too large",
    "bomb": r"CV_IO_MAX_IMAGE_PIXELS|image area too large",
    "redirect_loop": r"HTTP Error 302.*infinite loop",
    "unreachable": r"Connection refused",
    "ftp_scheme": r"^scheme not allowed$",
    "file_scheme": r"^scheme not allowed$",
}
REFUSED_KINDS = {"ftp_scheme", "file_scheme"}


def ingest(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.ingest", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, start_new_session=True)


def explain(r: subprocess.CompletedProcess) -> str:
    return f"exit {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"


def shard_digests(out: Path) -> dict[str, tuple[str, str, int]]:
    return {name: (e.status, e.sha256, e.samples) for name, e in load_manifest(out).shards.items()}


def per_url_outcomes(out: Path) -> dict[str, tuple[str, str | None]]:
    """url -> (status, error) for every row of the list, from img2dataset's parquets and refused.parquet."""
    outcomes: dict[str, tuple[str, str | None]] = {}
    rows = []
    for p in sorted((out / "_ingest" / "img2dataset").glob("*.parquet")):
        rows += [(r["url"], r["status"], r["error_message"])
                 for r in pq.read_table(p, columns=["url", "status", "error_message"]).to_pylist()]
    refused = out / "_ingest" / "refused.parquet"
    if refused.exists():
        rows += [(r["url"], "refused", r["reason"]) for r in pq.read_table(refused).to_pylist()]
    for url, status, error in rows:
        assert url not in outcomes, f"{url} recorded twice"
        outcomes[url] = (status, error)
    return outcomes


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    # main() sets OpenCV's size guard for the img2dataset workers it starts; not for this process.
    monkeypatch.delenv("OPENCV_IO_MAX_IMAGE_PIXELS", raising=False)


@pytest.fixture(scope="module")
def server():
    with ImageServer(huge_size=(1500, 1000)) as s:
        yield s


def mixed_rows(server: ImageServer, good: int, bad_each: int, seed: int) -> list[dict]:
    rows = [{"url": server.image_url(f"img-{seed}-{i}", "png" if i % 4 == 0 else "jpg"),
             "caption": f"picture number {i} of list {seed}", "kind": "good"} for i in range(good)]
    rows += [{"url": server.bad_url(kind, f"{seed}-{j}"), "caption": f"bad {kind} {j}", "kind": kind}
             for kind in BAD_KINDS for j in range(bad_each)]
    random.Random(seed).shuffle(rows)
    return rows


# --- the "done when": 500 URLs, good and bad ------------------------------------------
GATED = range(300, 310)  # URLs sent to img2dataset at these positions (shard 3) go through the gate


@pytest.fixture(scope="module")
def mixed_500(server, tmp_path_factory):
    """One uninterrupted ingest of 448 good and 52 bad URLs: the reference the kill test must reproduce."""
    tmp = tmp_path_factory.mktemp("mixed")
    rows = mixed_rows(server, good=448, bad_each=4, seed=1)
    assert len(rows) == 500
    sent = 0
    for row in rows:
        if row["kind"] not in REFUSED_KINDS:
            if sent in GATED and row["kind"] == "good":
                row["url"] = row["url"].replace("/img/", "/gated/")  # held only when a test closes the gate
            sent += 1
    urls = tmp / "list.tsv"
    with open(urls, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["url", "caption"], delimiter="\t", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    out = tmp / "out"
    args = ["--urls", urls, "--shard-size", 100, "--processes", 2, "--image-size", 128, *COMMON]
    r = ingest(*args, "--out", out)
    return rows, urls, out, args, r


def test_500_mixed_urls_ingest_completely_with_reasons(mixed_500, server):
    rows, _, out, _, r = mixed_500
    assert r.returncode == 0, explain(r)
    m = load_manifest(out)
    assert m.status == COMPLETE and m.stage == "ingest"
    good = [row for row in rows if row["kind"] == "good"]
    bad = [row for row in rows if row["kind"] != "good"]
    refused = [row for row in bad if row["kind"] in REFUSED_KINDS]
    counts = m.run["ingest"]["counts"]
    assert counts == {"urls": 500, "refused": len(refused), "downloaded": 500 - len(refused), "samples": len(good),
                      "failed": len(bad) - len(refused), "pending": 0}
    assert m.num_samples == len(good) and m.counts()["shards"] == 5  # 492 URLs sent, 100 per shard

    # Every URL recorded exactly once, each bad one with the reason of its kind.
    outcomes = per_url_outcomes(out)
    assert set(outcomes) == {row["url"] for row in rows}
    for row in rows:
        status, error = outcomes[row["url"]]
        if row["kind"] == "good":
            assert status == "success", (row, error)
        else:
            assert (status != "success"
                    and re.search(EXPECTED_ERROR[row["kind"]], error or "", re.S)), (row, status, error)
    # The manifest's reasons are the per-URL reasons, counted.
    expected = Counter(reason_of(err) for status, err in outcomes.values() if status not in ("success",))
    assert m.run["ingest"]["failures"] == dict(expected)
    assert m.run["ingest"]["failures"]["scheme not allowed"] == len(refused)
    assert m.run["ingest"]["failures"]["image area too large"] == 8  # huge and bomb, refused from their headers
    assert (m.run["ingest"]["source"]["sha256"]
            == hashlib.sha256(Path(m.run["ingest"]["source"]["path"]).read_bytes()).hexdigest())
    for entry in m.shards.values():
        stats = entry.info["img2dataset"]
        assert entry.samples == stats["successes"] and entry.failed_samples == stats["count"] - stats["successes"]

    # Samples: the alt-text as raw, img2dataset's metadata kept, sha256 of the stored bytes, only shrunk.
    caption_of = {row["url"]: row["caption"] for row in good}
    keys = set()
    for name in sorted(m.shards):
        for s in ShardReader(out / name):
            assert s.key not in keys
            keys.add(s.key)
            assert s.texts == {"raw": caption_of[s.source["url"]]}
            assert s.source["status"] == "success" and s.source["sha256"] == hashlib.sha256(s.image).hexdigest()
            name_ext = s.source["url"].rsplit("/", 1)[1]
            ow, oh = Image.open(io.BytesIO(server.image_bytes(*name_ext.split(".")))).size
            assert (s.source["original_width"], s.source["original_height"]) == (ow, oh)
            with Image.open(io.BytesIO(s.image)) as im:
                assert im.size == (s.source["width"], s.source["height"])
            assert max(s.source["width"], s.source["height"]) == min(128, max(ow, oh))
    assert len(keys) == len(good)

    # holiclip-manifest verify agrees with the manifest's counts.
    v = subprocess.run([MANIFEST_CLI, "verify", out, "--json"], capture_output=True, text=True)
    report = json.loads(v.stdout)
    assert v.returncode == 0 and report["ok"], report
    assert report["samples"] == counts["samples"] == m.text_stats.raw["raw"]["count"]
    # Working files: staging tars deleted once converted, the per-URL records kept.
    staging = out / "_ingest" / "img2dataset"
    assert not list(staging.glob("*.tar")) and len(list(staging.glob("*.parquet"))) == 5
    assert not (out / "_ingest" / "urls").exists()
    assert "500 URLs: 448 images, 44 failed, 8 refused" in r.stdout


def test_rerun_of_a_complete_ingest_downloads_nothing(mixed_500, server):
    rows, _, out, args, first = mixed_500
    assert first.returncode == 0, explain(first)
    before, requests = shard_digests(out), sum(server.requests.values())
    tars = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    r = ingest(*args, "--out", out)
    assert r.returncode == 0, explain(r)
    assert sum(server.requests.values()) == requests  # not one URL fetched again
    assert shard_digests(out) == before
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")} == tars


def test_resume_with_other_settings_or_list_is_refused(mixed_500, tmp_path):
    _, urls, out, args, first = mixed_500
    assert first.returncode == 0, explain(first)
    before = snapshot(out)
    r = ingest(*[a if a != 128 else 64 for a in args], "--out", out)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "image_size: 128 -> 64" in r.stderr, explain(r)
    other = tmp_path / "other.tsv"
    other.write_text(urls.read_text() + "http://127.0.0.1:1/extra.jpg\textra\n")
    r = ingest(*[other if a == urls else a for a in args], "--out", out)
    assert r.returncode == 2 and "another URL list" in r.stderr, explain(r)
    assert snapshot(out) == before


# --- kills and resumes ------------------------------------------------------------------------
def test_killed_at_every_point_resumes_to_the_same_shards(mixed_500, server, tmp_path):
    """SIGKILL of the whole process group at each point of a shard's life, then one last rerun:
    the shards must be byte-identical to the uninterrupted run's (nothing lost, nothing twice)."""
    _, _, reference_out, args, first = mixed_500
    assert first.returncode == 0, explain(first)
    out = tmp_path / "out"
    staging = out / "_ingest" / "img2dataset"

    def crash(point: str) -> None:
        r = ingest(*args, "--out", out, env={"HOLICLIP_INGEST_CRASH": point})
        assert r.returncode == -signal.SIGKILL and f"killed at '{point}'" in r.stderr, explain(r)

    def unconverted() -> list[str]:
        return sorted(p.name.removesuffix("_stats.json") for p in staging.glob("*_stats.json")
                      if not (out / "_shards" / f"{p.name.removesuffix('_stats.json')}.tar.json").exists())

    crash("prepare")  # the list was read, not yet marked ready
    assert not (out / "_ingest" / "state.json").exists() and not staging.exists()

    # Killed from outside while img2dataset downloads shard 3 (the server holds its requests).
    server.gate.clear()
    server.gated_hit.clear()
    try:
        with open(tmp_path / "log.txt", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.ingest", *map(str, args), "--out", str(out)],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            assert server.gated_hit.wait(300), (tmp_path / "log.txt").read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
    finally:
        server.gate.set()
    assert (staging / "00003.parquet").exists() and not (staging / "00003_stats.json").exists()
    assert load_manifest(out).status != COMPLETE

    crash("staged")  # img2dataset finished a shard, its conversion had not started
    assert unconverted()
    # img2dataset writes _stats.json in place: a kill while it writes leaves it cut short.
    cut = staging / f"{unconverted()[-1]}_stats.json"
    cut.write_bytes(cut.read_bytes()[:20])
    crash("converting")  # half-written shard on disk
    assert list(out.glob(".*.tar.partial-*"))
    crash("published")  # shard renamed into place, no record yet
    assert {p.name for p in out.glob("*.tar")} - {p.stem for p in (out / "_shards").glob("*.json")}
    crash("committed")  # record written, staging tar not yet deleted
    assert any((staging / p.stem).exists() for p in (out / "_shards").glob("*.json"))

    r = ingest(*args, "--out", out)
    assert r.returncode == 0, explain(r)
    assert shard_digests(out) == shard_digests(reference_out)
    report = verify_dataset(out)
    assert report.ok and report.samples == 448, report.problems
    assert not list(out.glob(".*.partial-*")) and not list(staging.glob("*.tar"))
    assert load_manifest(out).run["ingest"]["counts"] == load_manifest(reference_out).run["ingest"]["counts"]


# --- Ray ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_job_submit_with_ray_distributor(ray_cluster, server, tmp_path):
    # jsonl this time; --allow-any-scheme lets a file:// URL through (refused by default).
    local = tmp_path / "local.png"
    Image.new("RGB", (60, 40), (10, 200, 30)).save(local)
    rows = mixed_rows(server, good=50, bad_each=0, seed=3)
    rows += [{"url": server.bad_url("http_404", "r"), "caption": "missing", "kind": "http_404"},
             {"url": local.as_uri(), "caption": "a local file", "kind": "good"}]
    urls = tmp_path / "list.jsonl"
    urls.write_text("".join(json.dumps({"url": r["url"], "text": r["caption"], "uid": f"u{i}"}) + "\n"
                            for i, r in enumerate(rows)))
    out = tmp_path / "out"
    r = ray_cluster.submit("python", "-m", "pipeline.ingest", "--urls", str(urls), "--out", str(out),
                           "--caption-col", "text", "--keep-columns", "uid", "--distributor", "ray",
                           "--shard-size", "20", "--allow-any-scheme", *map(str, COMMON), timeout=600)
    assert r.returncode == 0, explain(r)
    m = load_manifest(out)
    assert m.status == COMPLETE and m.num_samples == 51 and m.counts()["shards"] == 3
    assert m.run["ingest"]["last_run"]["distributor"] == "ray"
    assert m.run["ingest"]["failures"] == {"HTTP Error 404: Not Found": 1}
    samples = {s.source["url"]: s for name in m.shards for s in ShardReader(out / name, with_images=False)}
    assert samples[local.as_uri()].texts == {"raw": "a local file"} and len(samples) == 51
    uid_of = {r["url"]: f"u{i}" for i, r in enumerate(rows)}
    assert all(s.source["uid"] == uid_of[url] for url, s in samples.items())
    report = verify_dataset(out)
    assert report.ok and report.samples == 51, report.problems


# --- the URL list, streamed ---------------------------------------------------------------------
def test_url_list_directory_of_gzipped_csv_is_streamed_into_whole_shard_parts(tmp_path):
    import gzip

    from pipeline.ingest.url_list import UrlList, prepare

    lists = tmp_path / "lists"
    lists.mkdir()
    a = ["http://127.0.0.1/0.jpg", "ftp://127.0.0.1/1.jpg", "https://127.0.0.1/2.jpg", "", "HTTP://127.0.0.1/4.jpg"]
    b = [f"http://127.0.0.1/{i}.jpg" for i in range(5, 11)] + ["file:///etc/passwd"]
    for name, urls in (("a.csv.gz", a), ("b.csv.gz", b)):
        with gzip.open(lists / name, "wt") as f:
            f.write("url,caption,uid\n" + "".join(f"{u},cap {u},{i}\n" for i, u in enumerate(urls)))
    (lists / "README.md").write_text("not a list")
    ulist = UrlList.open(lists, keep_columns=("uid",))
    assert [p.name for p in ulist.files] == ["a.csv.gz", "b.csv.gz"] and ulist.format == "csv"
    fp = ulist.fingerprint()
    files_sha = {f["name"]: f["sha256"] for f in fp["files"]}
    assert files_sha["a.csv.gz"] == hashlib.sha256((lists / "a.csv.gz").read_bytes()).hexdigest()
    assert fp["sha256"] == hashlib.sha256("".join(f"{n}\t{h}\n" for n, h in files_sha.items()).encode()).hexdigest()
    prepared = prepare(ulist, tmp_path / "parts", tmp_path / "refused.parquet", rows_per_part=4, progress=False)
    assert (prepared.rows, prepared.kept, prepared.parts) == (12, 9, 3)
    assert prepared.refused == {"missing url": 1, "scheme not allowed": 2}
    parts = sorted((tmp_path / "parts").glob("*.parquet"))
    tables = [pq.read_table(p) for p in parts]
    assert [t.num_rows for t in tables] == [4, 4, 1]  # whole shards per part: img2dataset numbers them alike
    kept = [u for t in tables for u in t.column("url").to_pylist()]
    assert kept == [u for u in a + b if u.lower().startswith(("http://", "https://"))]
    assert tables[0].column_names == ["url", "caption", "uid"] and tables[0].column("uid").to_pylist()[0] == "0"
    refused = pq.read_table(tmp_path / "refused.parquet").to_pylist()
    assert [(r["row"], r["reason"]) for r in refused] == [(1, "scheme not allowed"), (3, "missing url"),
                                                          (11, "scheme not allowed")]


# --- bad input: one clear line, before any work ------------------------------------------------
def _write_parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


BAD_LISTS = {
    "missing url column": ("list.csv", "link,caption\nhttp://127.0.0.1/a.jpg,a\n", [],
                           r"no column 'url' \(columns: link, caption\).*--url-col"),
    "missing caption column": ("list.csv", "url,text\nhttp://127.0.0.1/a.jpg,a\n", [],
                               r"no column 'caption'.*--caption-col"),
    "empty file": ("list.csv", "", [], r"the file is empty"),
    "empty parquet file": ("list.parquet", "", [], r"the file is empty"),
    "gzip of nothing": ("list.csv.gz", gzip.compress(b""), [], r"the file is empty"),
    "header only": ("list.tsv", "url\tcaption\n", [], r"has no rows"),
    "empty parquet": ("list.parquet", pa.table({"url": pa.array([], pa.string()),
                                                "caption": pa.array([], pa.string())}), [], r"has no rows"),
    "url column of numbers": ("list.parquet", pa.table({"url": [1, 2], "caption": ["a", "b"]}), [],
                              r"column 'url' holds int64"),
    "csv named parquet": ("list.parquet", "url,caption\nhttp://127.0.0.1/a.jpg,a\n", [], r"cannot read it as parquet"),
    "unknown extension": ("list.xlsx", "url,caption\n", [], r"cannot tell the format.*--input-format"),
    "not json lines": ("list.jsonl", "url,caption\nhttp://127.0.0.1/a.jpg,a\n", [], r"cannot read it as jsonl"),
    "no such file": (None, None, [], r"no such file"),
    "reserved kept column": ("list.csv", "url,caption,status\nhttp://127.0.0.1/a.jpg,a,x\n",
                             ["--keep-columns", "status"], r"--keep-columns: status"),
    "bad option value": ("list.csv", "url,caption\nhttp://127.0.0.1/a.jpg,a\n", ["--shard-size", "0"],
                         r"--shard-size: must be at least 1, got 0"),
}


@pytest.mark.parametrize("case", list(BAD_LISTS))
def test_bad_url_list_is_one_clear_error_before_any_work(case, tmp_path, capsys):
    name, content, extra, pattern = BAD_LISTS[case]
    path = tmp_path / (name or "missing.csv")
    if isinstance(content, pa.Table):
        _write_parquet(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    assert main(["--urls", str(path), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(pattern, err), err
    if case not in ("reserved kept column", "bad option value"):
        assert str(path) in err
    assert not out.exists()  # nothing started


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("link\nhttp://127.0.0.1/a.jpg\n")
    r = ingest("--urls", path, "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, explain(r)
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_second_ingest_into_the_same_directory_is_refused(tmp_path, capsys):
    path = tmp_path / "list.csv"
    path.write_text("url,caption\nhttp://127.0.0.1:1/a.jpg,a\n")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".ingest.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running ingest holds it
        assert main(["--urls", str(path), "--out", str(out)]) == 2
    assert "another ingest job is writing to this directory" in capsys.readouterr().err


def test_help_explains_the_command():
    r = ingest("--help")
    assert r.returncode == 0
    for option in ("--urls", "--from-webdataset", "--from-folder", "--out", "--url-col", "--caption-col",
                   "--image-size", "--resize-mode", "--processes", "--threads", "--shard-size", "--distributor",
                   "--allow-any-scheme", "ray job submit", "Exit status"):
        assert option in r.stdout, option


# --- imports without downloading ----------------------------------------------------------------
@pytest.fixture(scope="module")
def img2dataset_output(server, tmp_path_factory):
    """A directory written by plain img2dataset (not by us): .tar + .parquet + _stats.json."""
    tmp = tmp_path_factory.mktemp("plain")
    rows = mixed_rows(server, good=25, bad_each=0, seed=4) + [
        {"url": server.bad_url("http_404", "p"), "caption": "gone", "kind": "http_404"}]
    pq.write_table(pa.table({"url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows]}),
                   tmp / "l.parquet")
    code = ("import img2dataset; img2dataset.download(url_list='l.parquet', input_format='parquet', url_col='url', "
            "caption_col='caption', output_folder='out', output_format='webdataset', processes_count=1, "
            "thread_count=8, number_sample_per_shard=10, image_size=64, resize_mode='keep_ratio_largest', "
            "resize_only_if_bigger=True)")
    r = subprocess.run([sys.executable, "-c", f"if __name__ == '__main__': {code}"], cwd=tmp, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, explain(r)
    return tmp / "out", rows


def test_img2dataset_output_is_converted(img2dataset_output, tmp_path, capsys):
    src, rows = img2dataset_output
    before = snapshot(src)
    assert main(["--from-webdataset", str(src), "--no-progress"]) == 2  # not our format: never rewritten in place
    assert "cannot be indexed in place" in capsys.readouterr().err and snapshot(src) == before
    out = tmp_path / "imported"
    assert main(["--from-webdataset", str(src), "--out", str(out), "--no-progress"]) == 0
    assert snapshot(src) == before
    m = load_manifest(out)
    assert m.status == COMPLETE and m.num_samples == 25 and set(m.shards) == {"00000.tar", "00001.tar", "00002.tar"}
    assert sum(e.info["img2dataset"]["count"] for e in m.shards.values()) == 26  # its _stats.json kept per shard
    caption_of = {r["url"]: r["caption"] for r in rows}
    for name in m.shards:
        for s in ShardReader(out / name):
            assert s.texts == {"raw": caption_of[s.source["url"]]} and s.source["status"] == "success"
            assert s.source["sha256"] == hashlib.sha256(s.image).hexdigest()
    assert verify_dataset(out).ok


def test_conforming_shards_are_indexed_in_place_without_copying(mixed_500, tmp_path):
    _, _, ingested, _, first = mixed_500
    assert first.returncode == 0, explain(first)
    src = tmp_path / "shards"
    src.mkdir()
    for p in ingested.glob("*.tar"):
        shutil.copy2(p, src / p.name)
    tars = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in src.glob("*.tar")}
    assert main(["--from-webdataset", str(src), "--no-progress"]) == 0
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in src.glob("*.tar")} == tars
    m = load_manifest(src)
    assert m.status == COMPLETE and m.run["ingest"]["shards_by_method"] == {"indexed in place": 5}
    assert ({n: e.sha256 for n, e in m.shards.items()}
            == {n: e.sha256 for n, e in load_manifest(ingested).shards.items()})
    assert verify_dataset(src).ok
    # Into another directory on the same file system: hard links, still no copy.
    out = tmp_path / "linked"
    assert main(["--from-webdataset", str(src), "--out", str(out), "--no-progress"]) == 0
    assert all((out / n).stat().st_ino == (src / n).stat().st_ino for n in tars)
    assert verify_dataset(out).ok


def _img(fmt: str, size=(30, 20), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def test_generic_webdataset_is_converted_with_failures_recorded(tmp_path):
    src = tmp_path / "generic"
    src.mkdir()
    write_raw_tar(src / "a.tar", [("s1.jpg", _img("JPEG")), ("s1.caption", b"first caption"),
                         ("s2.png", _img("PNG")),
                         ("s2.json", json.dumps({"caption": "second", "license": "cc-by"}).encode()),
                         ("s3.gif", _img("GIF")), ("s3.caption", b"a gif"),
                         ("s4.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("s4.caption", b"broken")])
    write_raw_tar(src / "b.tar", [("dir/odd key.jpg", _img("JPEG", color=(1, 2, 3))),
                         ("dir/odd key.caption", b"odd key"),
                         ("s5.jpg", _img("PNG")), ("s5.caption", b"png bytes named jpg")])
    out = tmp_path / "out"
    assert main(["--from-webdataset", str(src), "--out", str(out), "--caption-col", "caption", "--no-progress"]) == 0
    m = load_manifest(out)
    assert m.status == COMPLETE and m.num_samples == 5
    failures = m.run["ingest"]["failures"]
    assert (len(failures) == 1 and next(iter(failures)).startswith("image does not decode (")
            and sum(failures.values()) == 1)
    samples = {s.texts["raw"]: s for n in m.shards for s in ShardReader(out / n)}
    assert set(samples) == {"first caption", "second", "a gif", "odd key", "png bytes named jpg"}
    # A GIF is stored as PNG (as img2dataset re-encodes what it downloads), its format recorded.
    gif = samples["a gif"]
    assert gif.image_ext == "png" and Image.open(io.BytesIO(gif.image)).format == "PNG"
    assert (gif.source["original_format"] == "GIF"
            and gif.source["original_sha256"] == hashlib.sha256(_img("GIF")).hexdigest())
    assert samples["second"].source["license"] == "cc-by"
    assert (samples["odd key"].source["original_key"] == "odd key"
            and re.fullmatch(r"[A-Za-z0-9_-]+", samples["odd key"].key))
    assert samples["png bytes named jpg"].image_ext == "png"  # bytes kept, extension corrected
    assert verify_dataset(out, decode_images=True).ok


def test_folder_with_sidecar_captions_is_imported_and_resumable(tmp_path):
    src = tmp_path / "photos"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "1.jpg").write_bytes(_img("JPEG"))
    (src / "a" / "1.txt").write_text("one from txt\n")
    (src / "a" / "b" / "2.png").write_bytes(_img("PNG", (50, 50)))
    (src / "a" / "b" / "2.json").write_text(json.dumps({"caption": "two from json", "photographer": "x"}))
    (src / "3.webp").write_bytes(_img("WEBP"))
    (src / "4.jpeg").write_bytes(_img("JPEG", (10, 90)))
    (src / "4.txt").write_text("four")
    (src / "bad.jpg").write_bytes(b"not an image")
    (src / "anim.gif").write_bytes(_img("GIF"))
    (src / "notes.md").write_text("ignored")
    out = tmp_path / "out"
    args = ["--from-folder", str(src), "--out", str(out), "--shard-size", "2", "--no-progress"]
    assert main(args) == 0
    m = load_manifest(out)
    assert m.status == COMPLETE and m.num_samples == 5 and len(m.shards) == 3
    assert m.run["ingest"]["counts"] == {"samples": 5, "failed": 1}
    by_path = {s.source["path"]: s for n in sorted(m.shards) for s in ShardReader(out / n)}
    assert set(by_path) == {"a/1.jpg", "a/b/2.png", "3.webp", "4.jpeg", "anim.gif"}
    assert by_path["anim.gif"].image_ext == "png" and by_path["anim.gif"].source["original_format"] == "GIF"
    assert by_path["a/1.jpg"].image == (src / "a" / "1.jpg").read_bytes()  # jpg/png/webp bytes never re-encoded
    assert by_path["a/1.jpg"].texts == {"raw": "one from txt"}  # the file's final newline is not part of it
    assert by_path["a/b/2.png"].texts == {"raw": "two from json"} and by_path["a/b/2.png"].source["photographer"] == "x"
    assert by_path["3.webp"].texts == {} and by_path["3.webp"].image_ext == "webp"
    assert (by_path["4.jpeg"].source["width"], by_path["4.jpeg"].source["height"]) == (10, 90)
    assert verify_dataset(out).ok
    before = snapshot(out)
    assert main(args) == 0  # nothing left to do
    assert {k: v for k, v in snapshot(out).items() if not k.endswith("manifest.json")} == \
        {k: v for k, v in before.items() if not k.endswith("manifest.json")}
    (src / "5.jpg").write_bytes(_img("JPEG"))
    assert main(args) == 2  # the folder changed: resuming would mix two listings
