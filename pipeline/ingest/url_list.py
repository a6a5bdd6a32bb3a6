"""The URL list of an ingest: its files, its columns, its checksum, and the cleaned copy img2dataset reads.

A list is one file or a directory of files of one format (LAION and DataComp ship hundreds of
parquet files): parquet, csv, tsv or jsonl, the last three optionally gzipped. The format comes
from the extension unless named.

Everything here streams. `UrlList.open` checks a list before any work starts by reading only
the schema (parquet) or the first block (csv, tsv, jsonl) of each file, never the whole list.
`prepare` then reads the list once, in record batches, and writes what img2dataset downloads:

    OUT/_ingest/urls/part-00000.parquet ...   columns url, caption (when the list has one), kept columns
    OUT/_ingest/refused.parquet                rows not sent to img2dataset: row, url, reason

Rows whose URL is not http(s) are refused here, before img2dataset sees them: img2dataset
fetches with urllib, which also opens file://, ftp:// and data: URLs, so a list could make the
ingest read local files. Refused and empty URLs are recorded with a reason, never dropped
silently. Each part holds a whole number of shards, so img2dataset's shard numbering (and with
it every sample key) is the same as for one big file, and the same on every rerun.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

FORMATS = ("parquet", "csv", "tsv", "jsonl")
_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv", ".tsv": "tsv", ".tsv.gz": "tsv",
             ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".ndjson": "jsonl", ".ndjson.gz": "jsonl"}
ALLOWED_SCHEMES = ("http://", "https://")
SCHEME_NOT_ALLOWED = "scheme not allowed"
MISSING_URL = "missing url"
BATCH_ROWS = 65536
# img2dataset reads one input file whole before it starts downloading from it: parts of about
# this many rows bound its memory and let the first downloads start quickly.
PART_ROWS = 100_000


class UrlListError(ValueError):
    """A URL list that cannot be used (missing, empty, wrong format or columns); the message names the file
    and the fix."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _format_of(path: Path) -> str:
    fmt = _SUFFIXES.get(_suffix(path))
    if fmt is None:
        raise UrlListError(f"{path}: cannot tell the format from the extension {_suffix(path) or '(none)'!r}; "
                           f"use .parquet, .csv, .tsv or .jsonl (optionally .gz), or name it with --input-format")
    return fmt


def _is_empty(path: Path) -> bool:
    """No bytes at all, or a gzip file of nothing."""
    if path.stat().st_size == 0:
        return True
    if path.name.lower().endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return not f.read(1)
        except (OSError, EOFError):
            return False  # not gzip after all: reading it says what is wrong
    return False


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


@dataclass
class UrlList:
    """A validated URL list. `batches()` yields its rows with columns renamed to url, caption, <kept>."""

    files: list[Path]
    format: str
    url_col: str
    caption_col: str | None
    keep_columns: tuple[str, ...] = ()
    rows: int | None = None  # known up front for parquet (from the footers), else None
    where: str = ""

    @classmethod
    def open(cls, path: str | os.PathLike, *, url_col: str = "url", caption_col: str | None = "caption",
             keep_columns: tuple[str, ...] = (), input_format: str | None = None) -> UrlList:
        path = Path(path)
        if not path.exists():
            raise UrlListError(f"{path}: no such file or directory "
                               "(give --urls a URL list: parquet, csv, tsv or jsonl)")
        if path.is_dir():
            candidates = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            by_format: dict[str, list[Path]] = {}
            for p in candidates:
                if _SUFFIXES.get(_suffix(p)):
                    by_format.setdefault(_SUFFIXES[_suffix(p)], []).append(p)
            if input_format is None and len(by_format) > 1:
                raise UrlListError(f"{path}: holds URL lists of several formats ({', '.join(sorted(by_format))}); "
                                   "keep one format per directory, or pick one with --input-format")
            fmt_in_dir = input_format or next(iter(by_format), None)
            # Files named for the format; with --input-format and no such names, every file.
            files = by_format.get(fmt_in_dir, []) or (candidates if input_format else [])
            if not files:
                raise UrlListError(f"{path}: no URL list files (.parquet, .csv, .tsv, .jsonl) in this directory")
        else:
            files = [path]
        fmt = input_format or _format_of(files[0])
        if fmt not in FORMATS:
            raise UrlListError(f"--input-format {fmt!r} is not one of {', '.join(FORMATS)}")
        ulist = cls(files=files, format=fmt, url_col=url_col, caption_col=caption_col or None,
                    keep_columns=tuple(keep_columns), where=str(path))
        rows = 0
        for f in files:
            n = ulist._check_file(f)
            rows = rows + n if (n is not None and rows is not None) else None
        if rows == 0:
            raise UrlListError(f"{path}: the URL list has no rows")
        ulist.rows = rows
        return ulist

    # --- reading --------------------------------------------------------------------------
    @property
    def _wanted(self) -> list[str]:
        cols = [self.url_col] + ([self.caption_col] if self.caption_col else []) + list(self.keep_columns)
        return list(dict.fromkeys(cols))

    def _reader(self, path: Path, wanted: list[str] | None):
        """A streaming batch reader; `wanted=None` opens it only to look at the columns."""
        import pyarrow.csv as pacsv
        import pyarrow.json as pajson
        import pyarrow.parquet as pq

        if self.format == "parquet":
            pf = pq.ParquetFile(path)
            return pf if wanted is None else pf.iter_batches(batch_size=BATCH_ROWS, columns=wanted)
        if self.format in ("csv", "tsv"):
            parse = pacsv.ParseOptions(delimiter="\t" if self.format == "tsv" else ",",
                                       newlines_in_values=True)
            convert = pacsv.ConvertOptions()
            if wanted is not None:
                # Forced to strings: type inference on the first block would break on a later
                # block (a caption column that starts with numbers), hours into a big list.
                convert = pacsv.ConvertOptions(include_columns=wanted,
                                               column_types={c: pa.string() for c in wanted})
            return pacsv.open_csv(path, parse_options=parse, convert_options=convert,
                                  read_options=pacsv.ReadOptions(block_size=8 << 20))
        parse = pajson.ParseOptions()
        if wanted is not None:
            string_cols = [self.url_col] + ([self.caption_col] if self.caption_col else [])
            parse = pajson.ParseOptions(
                explicit_schema=pa.schema([(c, pa.string()) for c in dict.fromkeys(string_cols)]),
                unexpected_field_behavior="infer" if self.keep_columns else "ignore")
        return pajson.open_json(path, parse_options=parse, read_options=pajson.ReadOptions(block_size=8 << 20))

    def _check_file(self, path: Path) -> int | None:
        """Columns and emptiness of one file, from its schema or first block; rows when known."""
        if _is_empty(path):
            raise UrlListError(f"{path}: the file is empty (a URL list needs a header and rows)")
        try:
            reader = self._reader(path, None)
            if self.format == "parquet":
                schema, rows = reader.schema_arrow, reader.metadata.num_rows
            else:
                schema, rows = reader.schema, None
                try:
                    first = reader.read_next_batch()
                except StopIteration:
                    first = None
                if first is None or first.num_rows == 0:
                    rows = 0
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as e:
            raise UrlListError(f"{path}: cannot read it as {self.format} ({str(e).splitlines()[0]}); "
                               "check the file, or name its format with --input-format") from None
        names = schema.names
        for col, flag in [(self.url_col, "--url-col"), (self.caption_col, "--caption-col"),
                          *[(c, "--keep-columns") for c in self.keep_columns]]:
            if col and col not in names:
                hint = " (or --caption-col '' for a list without captions)" if flag == "--caption-col" else ""
                raise UrlListError(f"{path}: no column {col!r} (columns: {', '.join(names) or 'none'}); "
                                   f"name the right one with {flag}{hint}")
        for col in filter(None, (self.url_col, self.caption_col)):
            if self.format == "parquet" and not _is_string(schema.field(col).type):
                raise UrlListError(f"{path}: column {col!r} holds {schema.field(col).type}, not strings; "
                                   "point the option at a text column")
        if rows == 0:
            raise UrlListError(f"{path}: the URL list has no rows")
        return rows

    def batches(self) -> Iterator[tuple[Path, pa.RecordBatch]]:
        """Every row once, in file order, as batches with columns url, [caption], kept columns."""
        for path in self.files:
            try:
                for batch in self._reader(path, self._wanted):
                    if batch.num_rows == 0:
                        continue
                    cols = {"url": batch.column(self.url_col).cast(pa.string())}
                    if self.caption_col:
                        cols["caption"] = batch.column(self.caption_col).cast(pa.string())
                    for c in self.keep_columns:
                        # Text formats infer types per block; strings stay the same type throughout.
                        cols[c] = batch.column(c) if self.format == "parquet" else batch.column(c).cast(pa.string())
                    yield path, pa.RecordBatch.from_pydict(cols)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError) as e:
                raise UrlListError(f"{path}: unreadable part of the URL list ({str(e).splitlines()[0]}); "
                                   "fix or remove the bad rows and rerun") from None

    # --- identity --------------------------------------------------------------------------
    def fingerprint(self, known: dict[str, Any] | None = None) -> dict[str, Any]:
        """Size, mtime and sha256 of every file, streamed; a file unchanged since `known` is not re-read."""
        previous = {f["name"]: f for f in (known or {}).get("files", [])}
        files = []
        for path in self.files:
            st = path.stat()
            old = previous.get(path.name)
            if old and old.get("bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
                sha = old["sha256"]
            else:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                sha = h.hexdigest()
            files.append({"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha})
        if len(files) == 1:
            total = files[0]["sha256"]
        else:
            total = hashlib.sha256("".join(f"{f['name']}\t{f['sha256']}\n" for f in files).encode()).hexdigest()
        return {"path": str(Path(self.where).resolve()), "format": self.format, "files": files, "sha256": total}


# --- the cleaned copy -------------------------------------------------------------------------
@dataclass
class PreparedList:
    """What `prepare` wrote: counts, and the reasons rows were refused."""

    rows: int = 0
    kept: int = 0
    parts: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "kept": self.kept, "parts": self.parts, "refused": self.refused}


def _refusals(urls: pa.Array, allow_any_scheme: bool) -> pa.Array:
    """Per row: None when the URL goes to img2dataset, else the reason it does not."""
    trimmed = pc.utf8_trim_whitespace(urls)
    missing = pc.fill_null(pc.equal(trimmed, ""), True)
    reasons = pc.if_else(missing, pa.scalar(MISSING_URL), pa.scalar(None, pa.string()))
    if not allow_any_scheme:
        head = pc.utf8_lower(pc.utf8_slice_codeunits(trimmed, 0, 8))
        allowed = pc.or_(pc.starts_with(head, ALLOWED_SCHEMES[0]), pc.starts_with(head, ALLOWED_SCHEMES[1]))
        reasons = pc.if_else(pc.or_(missing, pc.fill_null(allowed, False)), reasons, pa.scalar(SCHEME_NOT_ALLOWED))
    return reasons


def prepare(url_list: UrlList, dest: Path, refused_path: Path, *, rows_per_part: int,
            allow_any_scheme: bool = False, progress: bool = True) -> PreparedList:
    """Stream the list once into parts of `rows_per_part` rows for img2dataset; record refused rows.

    Runs again from scratch after an interruption (the caller marks it done), so it only ever
    writes into `dest`, which it empties first.
    """
    import pyarrow.parquet as pq
    from tqdm import tqdm

    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.parquet"):
        old.unlink()
    refused_path.unlink(missing_ok=True)
    result = PreparedList()
    refused = Counter()
    part_writer: pq.ParquetWriter | None = None
    part_rows = 0
    refused_writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None

    def next_part(schema: pa.Schema) -> pq.ParquetWriter:
        # Zero-padded so that img2dataset's sorted glob keeps the parts in order.
        return pq.ParquetWriter(dest / f"part-{result.parts:06d}.parquet", schema)

    bar = tqdm(total=url_list.rows, unit="url", desc="read URL list", disable=not progress, mininterval=1)
    try:
        for path, batch in url_list.batches():
            n = batch.num_rows
            reasons = _refusals(batch.column("url"), allow_any_scheme)
            keep_mask = pc.is_null(reasons)
            if pc.any(pc.invert(keep_mask)).as_py():
                rows = pa.array(range(result.rows, result.rows + n), pa.int64())
                mask = pc.invert(keep_mask)
                out = pa.table({"row": rows.filter(mask), "url": batch.column("url").filter(mask),
                                "reason": reasons.filter(mask)})
                refused_writer = refused_writer or pq.ParquetWriter(refused_path, out.schema)
                refused_writer.write_table(out)
                refused.update(out.column("reason").to_pylist())
            kept = batch.filter(keep_mask)
            if schema is None:
                schema = kept.schema
            elif kept.schema != schema:
                try:  # e.g. another parquet file storing a kept column with another type
                    kept = kept.cast(schema)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
                    raise UrlListError(f"{path}: its columns do not match the first file's ({e}); "
                                       "make the files of the list consistent") from None
            start = 0
            while start < kept.num_rows:
                if part_writer is None:
                    part_writer = next_part(kept.schema)
                take = min(rows_per_part - part_rows, kept.num_rows - start)
                part_writer.write_batch(kept.slice(start, take))
                part_rows += take
                start += take
                if part_rows == rows_per_part:
                    part_writer.close()
                    part_writer, part_rows = None, 0
                    result.parts += 1
            result.rows += n
            result.kept += kept.num_rows
            bar.update(n)
    finally:
        bar.close()
        if refused_writer is not None:
            refused_writer.close()
    if part_writer is not None:
        part_writer.close()
        result.parts += 1
    result.refused = dict(sorted(refused.items()))
    return result
