"""Evaluation of exported checkpoints: zero-shot classification, retrieval, branch analysis.

    python -m eval zeroshot | retrieval | compare ...      (cli.py; docs/evaluation.md)

data.py       evaluation sets: project-format shards, labelled WebDataset shards, class folders
embed.py      batched, bounded-memory embedding of images and texts
fusion.py     one score per (image, text) from H branches: average, max, norm-max, adaptive, subsets
metrics.py    ranks with the pessimistic tie rule, recall at k, top-k accuracy
retrieval.py  I2T / T2I recall per text id and pooled, several captions per image
zeroshot.py   class names, templates, the text classifier, accuracy
branches.py   per-branch analysis: branch m against text type n
report.py     tables, JSON records, results.jsonl, the heatmap
checkpoint.py loading an export with clear errors
"""
