"""The manifest: records, consolidation, resume, statistics and verification."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import PROVENANCE, make_dataset, make_sample

from data_manifests import COMPLETE, DatasetWriter, ManifestError, load_manifest
from data_manifests.manifest import MANIFEST_NAME, RECORDS_DIR
from data_manifests.verify import verify_dataset


def test_manifest_records_counts_checksums_provenance_and_stats(tmp_path):
    make_dataset(tmp_path, shards=3, per_shard=6)
    m = load_manifest(tmp_path)
    assert m.status == COMPLETE and m.num_samples == 18
    assert set(m.shards) == {"00000.tar", "00001.tar", "00002.tar"}
    for name, entry in m.shards.items():
        assert entry.bytes == (tmp_path / name).stat().st_size and len(entry.sha256) == 64
    assert m.texts["detail"]["prompt"]["text"] == PROVENANCE["detail"]["prompt"]["text"]
    stats = m.text_stats.to_json()
    # detail texts are flagged truncated for i % 4 == 3: i = 3 in each shard of 6.
    assert stats["detail"]["count"] == 18 and stats["detail"]["flags"] == {"truncated": 3}
    assert stats["detail"]["flag_rates"]["truncated"] == pytest.approx(3 / 18, abs=1e-4)
    assert stats["raw"]["words"]["p50"] == 2  # "shape N"
    on_disk = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert on_disk["counts"]["samples"] == 18 and on_disk["format"] == "holiclip-dataset/1"


def test_killed_between_consolidations_records_are_the_truth(tmp_path):
    writer = DatasetWriter(tmp_path, stage="test", flush_every_s=3600)
    writer.expect(["00000.tar", "00001.tar"])
    writer.set_texts(PROVENANCE)
    writer.flush()  # manifest.json now lists both shards as pending
    writer.write_shard("00000.tar", [make_sample(0, i) for i in range(4)])
    # "killed" here: manifest.json was not rewritten after the shard finished.
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["counts"]["samples"] == 0
    m = load_manifest(tmp_path)
    assert m.shards["00000.tar"].status == COMPLETE and m.shards["00001.tar"].status == "pending"
    assert m.num_samples == 4 and m.text_stats.raw["raw"]["count"] == 4

    resumed = DatasetWriter(tmp_path, stage="test")
    assert resumed.resumed and resumed.manifest.dataset_id == writer.manifest.dataset_id
    assert resumed.is_complete("00000.tar") and not resumed.is_complete("00001.tar")
    resumed.write_shard("00001.tar", [make_sample(1, i) for i in range(5)])
    resumed.finish()
    report = verify_dataset(tmp_path)
    assert report.ok, report.problems
    assert report.samples == 9 and load_manifest(tmp_path).text_stats.raw["raw"]["count"] == 9


def test_shard_file_that_differs_from_its_record_is_not_complete(tmp_path):
    make_dataset(tmp_path, shards=2, per_shard=3)
    writer = DatasetWriter(tmp_path, stage="test")
    with open(tmp_path / "00001.tar", "ab") as f:
        f.write(b"\0" * 512)
    assert writer.is_complete("00000.tar") and not writer.is_complete("00001.tar")
    os.remove(tmp_path / "00000.tar")
    assert not writer.is_complete("00000.tar")


def test_redone_shard_replaces_its_statistics(tmp_path):
    make_dataset(tmp_path, shards=2, per_shard=3)
    writer = DatasetWriter(tmp_path, stage="test")
    writer.write_shard("00001.tar", [make_sample(1, i) for i in range(5)])
    writer.finish()
    m = load_manifest(tmp_path)
    assert m.num_samples == 8 and m.text_stats.raw["raw"]["count"] == 8
    assert verify_dataset(tmp_path).ok


def test_failed_shards_leave_the_dataset_incomplete(tmp_path):
    writer = DatasetWriter(tmp_path, stage="test", flush_every_s=0)
    writer.expect(["00000.tar", "00001.tar"])
    writer.write_shard("00000.tar", [make_sample(0, 0)])
    writer.fail("00001.tar", "actor died 3 times")
    m = writer.finish()
    assert m.status == "incomplete"
    report = verify_dataset(tmp_path)
    assert not report.ok
    assert any("00001.tar: shard is failed (actor died 3 times)" in p for p in report.problems)


def test_crash_while_writing_the_manifest_leaves_the_old_one(tmp_path):
    # A process killed in the middle of writing manifest.json must leave the previous version.
    make_dataset(tmp_path, shards=1, per_shard=2)
    before = (tmp_path / MANIFEST_NAME).read_bytes()
    code = textwrap.dedent(f"""
        import os
        import data_manifests.manifest as mm
        w = mm.DatasetWriter({str(tmp_path)!r}, stage="test")
        os.fsync = lambda fd: os._exit(9)  # the new manifest is written, not yet renamed into place
        w.flush()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == 9
    assert (tmp_path / MANIFEST_NAME).read_bytes() == before
    assert load_manifest(tmp_path).num_samples == 2
    leftovers = [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(leftovers) == 1
    report = verify_dataset(tmp_path)
    assert report.ok and any("leftover" in w for w in report.warnings)


def test_verify_names_each_problem(tmp_path):
    make_dataset(tmp_path, shards=4, per_shard=5)
    # checksum disagrees: flip one byte inside an image of shard 0 (same size)
    data = bytearray((tmp_path / "00000.tar").read_bytes())
    data[700] ^= 0xFF
    (tmp_path / "00000.tar").write_bytes(bytes(data))
    # truncated shard 1, missing shard 2, extra shard
    raw = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(raw[: len(raw) // 2])
    os.remove(tmp_path / "00002.tar")
    (tmp_path / "99999.tar").write_bytes((tmp_path / "00003.tar").read_bytes())
    report = verify_dataset(tmp_path)
    text = "\n".join(report.problems)
    assert not report.ok
    assert "00000.tar: checksum mismatch" in text
    assert "00000.tar sample 000000000: image bytes do not match" in text or "00000.tar sample" in text
    assert "00001.tar: truncated" in text
    assert "00002.tar: listed as complete but the file is missing" in text
    assert "99999.tar: shard file is not in the manifest (extra)" in text


def test_verify_finds_duplicate_keys_across_shards(tmp_path):
    writer = DatasetWriter(tmp_path, stage="test")
    writer.write_shard("00000.tar", [make_sample(0, i) for i in range(3)])
    writer.write_shard("00001.tar", [make_sample(0, 2), make_sample(1, 0)])  # key 000000002 again
    writer.finish()
    report = verify_dataset(tmp_path)
    assert any("appear in more than one place" in p and "00000.tar and 00001.tar" in p for p in report.problems)


def test_unreadable_or_foreign_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{broken")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"format": "something-else"}')
    with pytest.raises(ManifestError, match="not a holiclip manifest"):
        load_manifest(tmp_path)
    report = verify_dataset(tmp_path)
    assert not report.ok and "not a holiclip manifest" in report.problems[0]


def test_unwritable_output_directory_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        # root ignores directory permissions; use a path under a regular file instead.
        target = tmp_path / "file"
        target.write_text("x")
        with pytest.raises(ManifestError, match="cannot create the dataset directory"):
            DatasetWriter(target / "out", stage="test")
    else:
        os.chmod(tmp_path, 0o500)
        with pytest.raises(ManifestError, match="not writable|cannot create"):
            DatasetWriter(tmp_path / "out", stage="test")


def test_records_directory_holds_one_record_per_finished_shard(tmp_path):
    make_dataset(tmp_path, shards=3, per_shard=2)
    records = sorted(p.name for p in (tmp_path / RECORDS_DIR).iterdir())
    assert records == ["00000.tar.json", "00001.tar.json", "00002.tar.json"]
    rec = json.loads((tmp_path / RECORDS_DIR / "00001.tar.json").read_text())
    assert rec["status"] == COMPLETE and rec["samples"] == 2 and rec["text_stats"]["raw"]["count"] == 2


def test_a_redone_shard_replaces_its_counters_without_reading_the_other_records(tmp_path, monkeypatch):
    import data_manifests.manifest as mm

    make_dataset(tmp_path, shards=3, per_shard=6)
    writer = DatasetWriter(tmp_path, stage="test")
    read = []
    real = mm.read_json
    monkeypatch.setattr(mm, "read_json", lambda path, what: read.append(path.name) or real(path, what))
    # Shard 1 again, with a text more per sample (what an incremental run does to every shard).
    samples = [make_sample(1, i) for i in range(4)]
    for s in samples:
        s.texts["extra"] = "one more text"
    writer.write_shard("00001.tar", samples)
    assert read == ["00001.tar.json"]  # its own old record, none of the others
    writer.finish()
    monkeypatch.undo()
    rebuilt = mm.TextStats()
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        rebuilt.merge(json.loads((tmp_path / RECORDS_DIR / f"{name}.json").read_text())["text_stats"])
    assert writer.manifest.text_stats.to_json() == rebuilt.to_json()
    assert rebuilt.raw["raw"]["count"] == 16 and rebuilt.raw["extra"]["count"] == 4
    assert load_manifest(tmp_path).text_stats.to_json() == rebuilt.to_json()

    # Without its old record the totals are rebuilt from the records.
    (tmp_path / RECORDS_DIR / "00002.tar.json").unlink()
    writer = DatasetWriter(tmp_path, stage="test")
    writer.write_shard("00002.tar", [make_sample(2, i) for i in range(2)])
    assert writer.manifest.text_stats.raw["raw"]["count"] == 12


def test_the_manifest_is_written_off_the_committing_thread_and_records_stay_the_truth(tmp_path, monkeypatch):
    import threading

    import data_manifests.manifest as mm

    names = [f"{s:05d}.tar" for s in range(4)]
    writer = DatasetWriter(tmp_path, stage="test", flush_every_s=0)
    writer.expect(names)
    writer.set_texts(PROVENANCE)
    gate = threading.Event()
    real_write = mm._ManifestFlusher._write
    threads = set()

    def slow_write(self, obj, taken_ns):
        threads.add(threading.current_thread().name)
        gate.wait(10)
        real_write(self, obj, taken_ns)

    monkeypatch.setattr(mm._ManifestFlusher, "_write", slow_write)
    writer.write_shard(names[0], [make_sample(0, i) for i in range(3)])  # its rewrite is held back
    writer.flush_every_s = 3600
    writer.write_shard(names[1], [make_sample(1, i) for i in range(4)])  # does not wait for it
    gate.set()
    deadline = time.monotonic() + 10
    while writer._flusher._written < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert threads == {"manifest-writer"}
    on_disk = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert on_disk["counts"]["shards_complete"] == 1  # the snapshot taken before shard 1
    # That file landed after shard 1's record, but is dated to its snapshot: the record is newer
    # and load_manifest reads it.
    assert load_manifest(tmp_path).num_samples == 7
    writer.finish()
    # The final write, made when nothing more can be committed, is not back-dated: readers of a
    # finished dataset read manifest.json alone.
    assert not mm._has_newer_records(tmp_path, (tmp_path / MANIFEST_NAME).stat().st_mtime_ns + 1)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["counts"]["samples"] == 7


def test_a_failed_manifest_write_is_raised_to_the_job(tmp_path, monkeypatch):
    import errno

    import data_manifests.manifest as mm

    writer = DatasetWriter(tmp_path, stage="test", flush_every_s=0)
    writer.set_texts(PROVENANCE)

    def full(self, obj, taken_ns):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mm._ManifestFlusher, "_write", full)
    writer.write_shard("00000.tar", [make_sample(0, 0)])  # its background rewrite fails
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_one_job_per_dataset_and_a_dead_jobs_lock_is_taken_over(tmp_path):
    from data_manifests import DatasetLocked, hold_lock

    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from data_manifests import hold_lock
        held = hold_lock(Path({str(tmp_path)!r}), "caption", "Ray job raysubmit_dead")
        print("held", flush=True)
        sys.stdin.read()  # until killed
    """)
    job = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline().strip() == "held"
        with pytest.raises(DatasetLocked, match=f"Ray job raysubmit_dead, pid {job.pid} on "):
            hold_lock(tmp_path, "caption")
    finally:
        job.kill()
        job.wait()
    held = hold_lock(tmp_path, "caption", "Ray job raysubmit_next")  # the kernel dropped the dead job's lock
    text = (tmp_path / ".caption.lock").read_text()
    assert text.startswith(f"Ray job raysubmit_next, pid {os.getpid()} on ") and "dead" not in text
    held.close()


def test_an_intent_whose_shard_was_never_published_is_dropped(tmp_path):
    from data_manifests import ShardInfo, TextStats, write_intent
    from data_manifests.manifest import INTENT_SUFFIX

    make_dataset(tmp_path, shards=2, per_shard=3)
    before = load_manifest(tmp_path).shards["00001.tar"]
    # The job stopped before the rename: the file on disk is still the recorded one.
    write_intent(tmp_path, ShardInfo("00001.tar", 3, 999, "0" * 64), TextStats(), extra={"text_identities": {}})
    writer = DatasetWriter(tmp_path, stage="test")
    assert writer.recover_intents() == []
    assert writer.manifest.shards["00001.tar"] == before
    assert not list((tmp_path / RECORDS_DIR).glob(f"*{INTENT_SUFFIX}"))
    assert verify_dataset(tmp_path).ok
