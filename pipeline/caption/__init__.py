"""The caption stage: image shards to multi-text shards, with VLMs in vLLM engines on Ray.

    python -m pipeline.caption --config pipeline/caption/configs/tiny_cpu.yaml

One noun per module. The per-shard work is plain Python a test can call without Ray; Ray appears
only in distributor.py:

    cli.py          the command line (`python -m pipeline.caption`)
    config.py       the job's YAML configuration, checked once
    provenance.py   how each text is made: records, identity hashes, conflicts
    plan.py         which texts each shard still needs
    job.py          the driver's books: manifest records, failures, figures, the summary
    distributor.py  the Ray side: engine actors, writer actors, the scheduling loop
    captioner.py    one shard through one captioner: read, decode, prompt, collect texts
    backends.py     the engines behind one interface: vLLM in-process, OpenAI-compatible servers
    images.py       image bytes to upright RGB pixels, and what a server is sent
    writer.py       the output shard: the source samples plus the new texts
"""
