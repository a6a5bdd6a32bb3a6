"""The data contract: multi-text WebDataset shards plus a manifest, and the tools to inspect them.

Every stage reads and writes datasets through this package (docs/data-format.md).
"""

from .manifest import (COMPLETE, FAILED, PENDING, DatasetWriter, Manifest, ManifestError, ShardEntry,
                       atomic_write_json, list_shard_files, load_manifest, now_iso, read_json)
from .quality import quality_flags
from .sample import RAW, Sample, SampleFormatError, check_text_id, sha256_hex
from .shard import Problem, ShardInfo, ShardReadError, ShardReader, ShardWriteError, ShardWriter
from .textstats import TextStats

__all__ = [
    "COMPLETE", "FAILED", "PENDING", "RAW", "DatasetWriter", "Manifest", "ManifestError", "Problem", "Sample",
    "SampleFormatError", "ShardEntry", "ShardInfo", "ShardReadError", "ShardReader", "ShardWriteError",
    "ShardWriter", "TextStats", "atomic_write_json", "check_text_id", "list_shard_files", "load_manifest", "now_iso",
    "read_json",
    "quality_flags", "sha256_hex",
]
