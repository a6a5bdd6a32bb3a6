"""What an ingest is asked to do: the settings of a download and of an import, checked once.

The settings come from the command line (cli.py); the models below validate what argparse
produced, with the shared mechanism of data_manifests/config.py. Their keys are the flags
(`--image-size`), so an error names the flag the user typed: "--image-size: must be at least 8, got 4".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from data_manifests.config import ConfigModel, Strings

RESIZE_MODES = ("keep_ratio_largest", "keep_ratio", "center_crop", "border", "no")
ENCODE_FORMATS = ("jpg", "png", "webp")
# img2dataset reserves these names for its own per-sample metadata.
RESERVED_COLUMNS = {"key", "caption", "url", "width", "height", "original_width", "original_height", "status",
                    "error_message", "exif", "md5", "sha256", "sha512"}
DEFAULT_CAPTION_KEYS = ("txt", "caption")


class IngestError(Exception):
    """A configuration or input problem a user can fix; the message names the option or file."""


class FlagSettings(ConfigModel):
    # Built from Python names (image_size=...), reported under the flag (--image-size).
    model_config = ConfigDict(alias_generator=lambda name: "--" + name.replace("_", "-"), validate_by_name=True)


class DownloadConfig(FlagSettings):
    urls: Path
    out: Path
    url_col: str = "url"
    caption_col: str | None = "caption"
    keep_columns: Strings = ()
    input_format: Literal["parquet", "csv", "tsv", "jsonl"] | None = None
    image_size: int = Field(448, ge=8)
    resize_mode: Literal[*RESIZE_MODES] = "keep_ratio_largest"
    allow_upscale: bool = False
    encode_format: Literal[*ENCODE_FORMATS] = "jpg"
    encode_quality: int | None = None  # None: 95 for jpg and webp, 9 for png
    shard_size: int = Field(10000, ge=1)
    max_image_area: float = Field(1e8, gt=0)
    allow_any_scheme: bool = False
    processes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    threads: int = Field(64, ge=1)
    timeout: int = Field(10, ge=1)  # seconds
    retries: int = Field(0, ge=0)
    distributor: Literal["multiprocessing", "ray"] = "multiprocessing"
    convert_workers: int = Field(2, ge=1)
    progress: bool = True
    crash_at: str | None = None  # tests: where to simulate a crash (cli.py checks the name)

    @field_validator("keep_columns")
    @classmethod
    def _not_reserved(cls, columns: tuple[str, ...]) -> tuple[str, ...]:
        clash = sorted(RESERVED_COLUMNS & set(columns))
        if clash:
            raise ValueError(f"{', '.join(clash)} are names img2dataset uses for its own metadata; "
                             "keep other columns, or rename them in the list")
        return columns

    @field_validator("encode_quality")
    @classmethod
    def _quality_range(cls, quality: int | None, info: ValidationInfo) -> int | None:
        top = 9 if info.data.get("encode_format") == "png" else 100
        if quality is not None and not 0 <= quality <= top:
            raise ValueError(f"must be 0-100 for jpg and webp, 0-9 (compression) for png, got {quality}")
        return quality

    @property
    def quality(self) -> int:
        if self.encode_quality is not None:
            return self.encode_quality
        return 9 if self.encode_format == "png" else 95

    def output_settings(self) -> dict[str, Any]:
        """What decides the shards' content; a resume must use the same (timeouts, threads may change)."""
        return {"url_col": self.url_col, "caption_col": self.caption_col, "keep_columns": list(self.keep_columns),
                "image_size": self.image_size, "resize_mode": self.resize_mode, "allow_upscale": self.allow_upscale,
                "encode_format": self.encode_format, "encode_quality": self.quality, "shard_size": self.shard_size,
                "max_image_area": self.max_image_area, "allow_any_scheme": self.allow_any_scheme}


class ImportConfig(FlagSettings):
    # member extensions or JSON fields; None: DEFAULT_CAPTION_KEYS
    caption_keys: Strings | None = Field(None, alias="--caption-col")
    shard_size: int = Field(10000, ge=1)
    max_image_area: float = Field(1e8, gt=0)
    progress: bool = True

    @property
    def keys(self) -> tuple[str, ...]:
        return self.caption_keys or DEFAULT_CAPTION_KEYS
