"""Data stages: ingest (URL lists to image shards, with img2dataset) and captioning (Ray + vLLM)."""
