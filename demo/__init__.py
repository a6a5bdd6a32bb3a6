"""`make demo`: the whole pipeline on built-in data, each stage run with its real command.

    python -m demo                      # everything, into runs/demo

It imports the stages; no stage imports it.

    main.py       the program: scenes -> ingest -> caption -> split -> train -> eval -> report
    scenes.py     pictures of shapes with web-like alt-texts, and their reference texts
    split.py      captioned shards -> train and test datasets, plus labelled zero-shot sets
    report.py     the runs' results side by side, and where every artefact is
    tiny_vlm.py   tiny randomly initialised VLMs that vLLM serves (the fallback captioner, tests)
    configs/      the demo's caption and training configs
"""
