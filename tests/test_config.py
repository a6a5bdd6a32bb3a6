"""The shared config mechanism (data_manifests/config.py): strict models, YAML loading, and the one
formatter that turns pydantic's errors into "<file>: <path>: <what is wrong>". The stages' own
configs are tested in test_train_config.py, test_caption_plan.py and test_ingest.py."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, field_validator

from data_manifests.config import ConfigError, ConfigModel, Strings, read_yaml, validate
from pipeline.ingest.config import DownloadConfig, ImportConfig, IngestError


class Engine(ConfigModel):
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_len: int = Field(4096, ge=1)


class Captioner(ConfigModel):
    name: str
    engine: Engine = Engine()
    tags: Strings = ()

    @field_validator("name")
    @classmethod
    def _no_slash(cls, name: str) -> str:
        if "/" in name:
            raise ValueError(f"{name!r} contains '/'")
        return name


class Job(ConfigModel):
    captioners: list[Captioner]
    rate: float | None = Field(None, gt=0)
    sampling: dict[Literal["temperature", "top_p"], float] = {}


def message(data) -> str:
    with pytest.raises(ConfigError) as e:
        validate(Job, data, "job.yaml")
    return str(e.value)


def job(**captioner) -> dict:
    return {"captioners": [{"name": "a"}, {"name": "b", **captioner}]}


@pytest.mark.parametrize("data,expected", [
    (job(engine={"dtyp": "float32"}),
     "job.yaml: captioners[1].engine.dtyp: unknown key (known here: dtype, max_len) (did you mean 'dtype'?)"),
    ({**job(), "captioner": []}, "job.yaml: captioner: unknown key (known here: captioners, rate, sampling) "
                                 "(did you mean 'captioners'?)"),
    ({**job(), "sampling": {"temprature": 1.0}}, "job.yaml: sampling.temprature: unknown key "
                                                 "(known here: temperature, top_p) (did you mean 'temperature'?)"),
    (job(engine={"dtype": "fp8"}),
     "job.yaml: captioners[1].engine.dtype: must be one of ['float32', 'bfloat16'], got 'fp8'"),
    (job(tags=["x", 5]), "job.yaml: captioners[1].tags[1]: expected a string, got 5"),
    (job(engine={"max_len": 0}), "job.yaml: captioners[1].engine.max_len: must be at least 1, got 0"),
    ({**job(), "rate": -1}, "job.yaml: rate: must be > 0 or null, got -1"),
    (job(engine={"max_len": "8"}), "job.yaml: captioners[1].engine.max_len: expected an integer, got '8'"),
    (job(engine={"max_len": True}), "job.yaml: captioners[1].engine.max_len: expected an integer, got True"),
    (job(engine={"max_len": 8.0}), "job.yaml: captioners[1].engine.max_len: expected an integer, got 8.0"),
    ({**job(), "rate": "fast"}, "job.yaml: rate: expected a number or null, got 'fast'"),
    ({"captioners": [{}]}, "job.yaml: captioners[0].name: missing (required)"),
    (job(name="a/b"), "job.yaml: captioners[1].name: 'a/b' contains '/'"),
    ({"captioners": {"name": "a"}}, "job.yaml: captioners: expected a list, got {'name': 'a'}"),
    (["not", "a", "mapping"], "job.yaml: expected a mapping, got ['not', 'a', 'mapping']"),
])
def test_errors_name_file_path_and_what_is_wrong(data, expected):
    assert message(data) == expected


def test_valid_data_is_typed_and_frozen():
    cfg = validate(Job, {**job(tags="one"), "rate": 2, "sampling": {"top_p": 1}})
    assert cfg.captioners[1].tags == ("one",) and cfg.captioners[0].tags == ()  # a string is a list of one
    assert cfg.rate == 2.0 and cfg.sampling == {"top_p": 1.0} and cfg.captioners[1].engine.max_len == 4096
    with pytest.raises(ValueError, match="frozen"):
        cfg.rate = 3.0


def test_the_stage_chooses_the_exception():
    with pytest.raises(IngestError, match=r"^--image-size: must be at least 8, got 4$"):
        validate(DownloadConfig, {"urls": Path("u.csv"), "out": Path("o"), "image_size": 4}, error=IngestError)


def test_ingest_settings_name_the_flag():
    """Ingest has no nested keys: its settings are the command line's flags, and errors name them."""
    with pytest.raises(IngestError, match=r"^--keep-columns: status are names img2dataset uses"):
        validate(DownloadConfig, {"urls": Path("u"), "out": Path("o"), "keep_columns": ("uid", "status")},
                 error=IngestError)
    with pytest.raises(IngestError, match=r"^--encode-quality: must be 0-100 for jpg and webp, 0-9 .* got 10$"):
        validate(DownloadConfig, {"urls": Path("u"), "out": Path("o"), "encode_format": "png", "encode_quality": 10},
                 error=IngestError)
    with pytest.raises(IngestError, match=r"^--caption-col\[1\]: expected a string, got 3$"):
        validate(ImportConfig, {"caption_keys": ("txt", 3)}, error=IngestError)
    cfg = validate(DownloadConfig, {"urls": Path("u"), "out": Path("o"), "encode_format": "png"})
    assert cfg.quality == 9 and validate(ImportConfig, {}).keys == ("txt", "caption")


def test_read_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"^c\.yaml: cannot read it \(config file not found\)$"):
        read_yaml(tmp_path / "missing.yaml", "c.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed")
    with pytest.raises(ConfigError, match=r"^c\.yaml: invalid YAML \("):
        read_yaml(bad, "c.yaml")
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"^c\.yaml: expected a mapping of keys at the top level, got \['a', 'b'\]$"):
        read_yaml(bad, "c.yaml")
    bad.write_bytes(b"a: \xff\n")
    with pytest.raises(ConfigError, match=r"not UTF-8"):
        read_yaml(bad, "c.yaml")
    bad.write_text("# only a comment\n")
    assert read_yaml(bad, "c.yaml") == {}
