"""The data contract: multi-text WebDataset shards plus a manifest, and the tools to inspect them.

Every stage reads and writes datasets through this package (docs/data-format.md).
"""

from .files import (
                    PARTIAL_GLOB,
                    atomic_open,
                    atomic_write_bytes,
                    atomic_write_json,
                    atomic_write_text,
                    now_iso,
                    open_binary,
                    partial_name,
                    partial_path,
                    publish,
                    readable_name,
)
from .img2dataset import read_img2dataset_stats, stats_path, top_reasons
from .lock import DatasetLocked, hold_lock
from .manifest import (
                    COMPLETE,
                    FAILED,
                    PENDING,
                    DatasetWriter,
                    Manifest,
                    ManifestError,
                    ShardEntry,
                    list_shard_files,
                    load_manifest,
                    read_json,
                    write_intent,
)
from .quality import quality_flags
from .sample import RAW, Sample, SampleFormatError, check_text_id, sha256_hex
from .shard import ShardInfo, ShardReader, ShardWriteError, ShardWriter
from .tar import MemberName, Problem, ShardReadError, TarReader, parse_member_name
from .textstats import TextStats

__all__ = [
    "COMPLETE", "FAILED", "PARTIAL_GLOB", "PENDING", "RAW", "DatasetLocked", "DatasetWriter", "Manifest",
    "ManifestError", "MemberName", "Problem", "Sample", "SampleFormatError", "ShardEntry", "ShardInfo",
    "ShardReadError", "ShardReader", "ShardWriteError", "ShardWriter", "TarReader", "TextStats", "atomic_open",
    "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "check_text_id", "hold_lock",
    "list_shard_files", "load_manifest", "now_iso", "open_binary", "parse_member_name", "partial_name",
    "partial_path", "publish", "quality_flags", "read_img2dataset_stats", "read_json", "readable_name",
    "sha256_hex", "stats_path", "top_reasons", "write_intent",
]
