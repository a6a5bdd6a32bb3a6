"""The ingest stage: URL lists to image shards with img2dataset, and existing data imported.

    python -m pipeline.ingest --urls cc3m.parquet --out /data/cc3m/images

One noun per module, in the order data goes through them:

    cli.py         the command line (`python -m pipeline.ingest`)
    config.py      what a download or an import is asked to do, checked once
    url_list.py    the URL list: its files, columns and checksum, and the cleaned copy img2dataset reads
    downloader.py  a download run: img2dataset over the cleaned list, resumable at every point
    staging.py     img2dataset's output, and the collector that converts it shard by shard
    converter.py   one foreign shard (img2dataset's, or any WebDataset) to one shard of ours
    importer.py    existing WebDataset shards or a folder of images, without downloading
    output.py      the output dataset: its lock, its writer, the summary
"""
