"""What an ingest is asked to do: the settings of a download and of an import, checked once."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

RESIZE_MODES = ("keep_ratio_largest", "keep_ratio", "center_crop", "border", "no")
ENCODE_FORMATS = ("jpg", "png", "webp")
# img2dataset reserves these names for its own per-sample metadata.
RESERVED_COLUMNS = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
                    "error_message", "exif", "md5", "sha256", "sha512"}


class IngestError(Exception):
    """A configuration or input problem a user can fix; the message names the option or file."""


@dataclass(frozen=True)
class DownloadConfig:
    urls: Path
    out: Path
    url_col: str = "url"
    caption_col: str | None = "caption"
    keep_columns: tuple[str, ...] = ()
    input_format: str | None = None
    image_size: int = 448
    resize_mode: str = "keep_ratio_largest"
    allow_upscale: bool = False
    encode_format: str = "jpg"
    encode_quality: int | None = None
    shard_size: int = 10000
    max_image_area: float = 1e8
    allow_any_scheme: bool = False
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads: int = 64
    timeout: int = 10
    retries: int = 0
    distributor: str = "multiprocessing"
    convert_workers: int = 2
    progress: bool = True
    crash_at: str | None = None

    @property
    def quality(self) -> int:
        if self.encode_quality is not None:
            return self.encode_quality
        return 9 if self.encode_format == "png" else 95

    def validate(self) -> "DownloadConfig":
        checks = [
            (self.image_size >= 8, "--image-size must be at least 8"),
            (self.shard_size >= 1, "--shard-size must be at least 1"),
            (self.processes >= 1, "--processes must be at least 1"),
            (self.threads >= 1, "--threads must be at least 1"),
            (self.timeout >= 1, "--timeout must be at least 1 second"),
            (self.retries >= 0, "--retries cannot be negative"),
            (self.convert_workers >= 1, "--convert-workers must be at least 1"),
            (self.max_image_area > 0, "--max-image-area must be positive"),
            (self.resize_mode in RESIZE_MODES, f"--resize-mode must be one of {', '.join(RESIZE_MODES)}"),
            (self.encode_format in ENCODE_FORMATS, f"--encode-format must be one of {', '.join(ENCODE_FORMATS)}"),
            (0 <= self.quality <= (9 if self.encode_format == "png" else 100),
             "--encode-quality must be 0-100 for jpg and webp, 0-9 (compression) for png"),
        ]
        for ok, message in checks:
            if not ok:
                raise IngestError(message)
        clash = sorted(RESERVED_COLUMNS & set(self.keep_columns))
        if clash:
            raise IngestError(f"--keep-columns: {', '.join(clash)} are names img2dataset uses for its own metadata; "
                              "keep other columns, or rename them in the list")
        return self

    def output_settings(self) -> dict[str, Any]:
        """What decides the shards' content; a resume must use the same (timeouts, threads may change)."""
        return {"url_col": self.url_col, "caption_col": self.caption_col, "keep_columns": list(self.keep_columns),
                "image_size": self.image_size, "resize_mode": self.resize_mode, "allow_upscale": self.allow_upscale,
                "encode_format": self.encode_format, "encode_quality": self.quality, "shard_size": self.shard_size,
                "max_image_area": self.max_image_area, "allow_any_scheme": self.allow_any_scheme}


DEFAULT_CAPTION_KEYS = ("txt", "caption")


@dataclass(frozen=True)
class ImportConfig:
    caption_keys: tuple[str, ...] | None = None  # member extensions or JSON fields; None: DEFAULT_CAPTION_KEYS
    shard_size: int = 10000
    max_image_area: float = 1e8
    progress: bool = True

    @property
    def keys(self) -> tuple[str, ...]:
        return self.caption_keys or DEFAULT_CAPTION_KEYS
