"""`python -m pipeline.ingest`: the command line of the ingest stage."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from data_manifests import ManifestError
from data_manifests.config import validate

from .config import ENCODE_FORMATS, RESIZE_MODES, DownloadConfig, ImportConfig, IngestError
from .downloader import DownloadRun
from .importer import import_folder, import_webdataset
from .staging import CRASH_POINTS
from .url_list import UrlListError

# --- command line -------------------------------------------------------------------------
HELP = "Ingest: URL lists to image shards with img2dataset, and existing datasets imported in place."
EPILOG = """\
examples:
  python -m pipeline.ingest --urls cc3m.tsv --out data/cc3m
  python -m pipeline.ingest --urls laion/ --url-col URL --caption-col TEXT --out data/laion --processes 16
  ray job submit --address http://HEAD:8265 --working-dir . -- \\
      python -m pipeline.ingest --urls /shared/laion/ --url-col URL --caption-col TEXT \\
          --out /shared/laion_shards --distributor ray
  python -m pipeline.ingest --from-webdataset data/img2dataset_out --out data/imported
  python -m pipeline.ingest --from-webdataset data/our_shards            # index in place, no copy
  python -m pipeline.ingest --from-folder photos/ --out data/photos

The output is the project's dataset format (docs/data-format.md): OUT/*.tar + OUT/manifest.json.
A download keeps its working files in OUT/_ingest/: img2dataset's per-shard .parquet lists every
URL with its status and error message, refused.parquet the rows refused before downloading.
Rerun the same command to resume an interrupted ingest; only what is missing is done.
Exit status: 0 complete, 1 incomplete (rerun to finish; an input shard that cannot be read is named
instead: fix or remove it), 2 bad input or configuration.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.ingest", description=HELP, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to ingest (one of)")
    src = what.add_mutually_exclusive_group(required=True)
    src.add_argument("--urls", type=Path, metavar="FILE|DIR",
                     help="URL list to download: .parquet, .csv, .tsv or .jsonl (.gz allowed for text formats), "
                          "or a directory of such files")
    src.add_argument("--from-webdataset", type=Path, metavar="DIR",
                     help="import WebDataset shards (img2dataset output, or any image + caption per sample); "
                          "shards already in the project's format are indexed in place, without copying")
    src.add_argument("--from-folder", type=Path, metavar="DIR",
                     help="import a folder of images with sidecar .txt or .json captions: "
                          ".jpg .png .webp stored as they are; "
                          ".gif (first frame) .bmp .tif .tiff .ppm .avif converted to lossless PNG")
    what.add_argument("--out", type=Path, metavar="DIR",
                      help="output dataset directory (optional for --from-webdataset: in place)")

    cols = p.add_argument_group("URL list")
    cols.add_argument("--url-col", default="url", metavar="NAME", help="column holding the URL (default: url)")
    cols.add_argument("--caption-col", default=None, metavar="NAME",
                      help="column holding the alt-text, stored as the 'raw' text (default: caption; '' for none). "
                           "For imports: member extensions or JSON fields holding the caption, comma-separated, "
                           "tried in order (default: txt,caption; a folder's <image>.txt is the txt member)")
    cols.add_argument("--keep-columns", default="", metavar="A,B",
                      help="other columns to keep in each sample's source metadata (e.g. uid)")
    cols.add_argument("--input-format", choices=("parquet", "csv", "tsv", "jsonl"),
                      help="format of the list when its extension does not say")
    cols.add_argument("--allow-any-scheme", action="store_true",
                      help="also download URLs that are not http(s) (file://, ftp://, data:); refused by default "
                           "because they can read local files")

    img = p.add_argument_group("images")
    img.add_argument("--image-size", type=int, default=448, metavar="PX",
                     help="target size in pixels (default 448: captioners tile or resize anyway)")
    img.add_argument("--resize-mode", default="keep_ratio_largest", choices=RESIZE_MODES,
                     help="img2dataset resize mode (default keep_ratio_largest: keep the aspect ratio, "
                          "the long side at most --image-size)")
    img.add_argument("--allow-upscale", action="store_true",
                     help="also enlarge smaller images (default: only shrink)")
    img.add_argument("--encode-format", default="jpg", choices=ENCODE_FORMATS)
    img.add_argument("--encode-quality", type=int, metavar="Q",
                     help="0-100 for jpg/webp (default 95), 0-9 for png (default 9)")
    img.add_argument("--max-image-area", type=float, default=1e8, metavar="PIXELS",
                     help="refuse larger images before decoding them (default 1e8 = 100 megapixels)")

    dl = p.add_argument_group("download")
    dl.add_argument("--shard-size", type=int, default=10000, metavar="N",
                    help="samples per shard (default 10000; also for --from-folder)")
    dl.add_argument("--processes", type=int, default=os.cpu_count() or 1, metavar="N",
                    help="download processes (default: one per CPU; ignored with --distributor ray)")
    dl.add_argument("--threads", type=int, default=64, metavar="N", help="download threads per process (default 64)")
    dl.add_argument("--timeout", type=int, default=10, metavar="SECONDS",
                    help="seconds before a URL counts as unreachable (default 10)")
    dl.add_argument("--retries", type=int, default=0, metavar="N", help="retries per failed URL (default 0)")
    dl.add_argument("--distributor", default="multiprocessing", choices=("multiprocessing", "ray"),
                    help="run img2dataset's shards on local processes, or as Ray tasks over a cluster "
                         "(launch with `ray job submit`; OUT must be on storage every node sees)")
    dl.add_argument("--convert-workers", type=int, default=2, metavar="N",
                    help="shards converted at the same time while downloading (default 2)")
    dl.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _set_environment(max_image_area: float) -> None:
    # Read by img2dataset's worker processes, which inherit this environment; set before importing it.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks the network at import
    os.environ.setdefault("WANDB_MODE", "disabled")
    if math.isfinite(max_image_area):
        # img2dataset checks the area only after a full decode; OpenCV's guard refuses a huge
        # image (a few KB of PNG can claim 50000x50000 pixels) from its header, before allocating.
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(int(max_image_area))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    crash_at = os.environ.get("HOLICLIP_INGEST_CRASH") or None
    if crash_at is not None and crash_at not in CRASH_POINTS:
        print(f"error: HOLICLIP_INGEST_CRASH={crash_at!r} is not one of {', '.join(CRASH_POINTS)}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    try:
        if args.urls is not None:
            if args.out is None:
                raise IngestError("--urls needs --out DIR (where the shards and the manifest go)")
            _set_environment(args.max_image_area)
            cfg = validate(DownloadConfig, dict(
                urls=args.urls, out=args.out, url_col=args.url_col,
                caption_col="caption" if args.caption_col is None else (args.caption_col or None),
                keep_columns=_split(args.keep_columns), input_format=args.input_format,
                image_size=args.image_size, resize_mode=args.resize_mode, allow_upscale=args.allow_upscale,
                encode_format=args.encode_format, encode_quality=args.encode_quality, shard_size=args.shard_size,
                max_image_area=args.max_image_area, allow_any_scheme=args.allow_any_scheme,
                processes=args.processes, threads=args.threads, timeout=args.timeout, retries=args.retries,
                distributor=args.distributor, convert_workers=args.convert_workers, progress=progress,
                crash_at=crash_at), error=IngestError)
            return DownloadRun(cfg).run()
        icfg = validate(ImportConfig, dict(caption_keys=_split(args.caption_col) if args.caption_col else None,
                                           shard_size=args.shard_size, max_image_area=args.max_image_area,
                                           progress=progress), error=IngestError)
        if args.from_webdataset is not None:
            return import_webdataset(args.from_webdataset, args.out, icfg)
        if args.out is None:
            raise IngestError("--from-folder needs --out DIR (where the shards and the manifest go)")
        return import_folder(args.from_folder, args.out, icfg)
    except (IngestError, UrlListError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130

