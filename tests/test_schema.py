"""The study file's JSON Schema (mmcl/schema.py): what editors check a study against."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml

from mmcl.schema import SCHEMA_FILE, study_schema

from .conftest import REPO

STUDIES = sorted((REPO / "studies").glob("*.yaml"))


@pytest.fixture(scope="module")
def schema():
    return study_schema()


def test_committed_schema_is_the_generated_one(schema):
    committed = json.loads((REPO / "studies" / SCHEMA_FILE).read_text())
    assert committed == schema, "studies/study.schema.json is stale: uv run mmcl schema > studies/study.schema.json"


@pytest.mark.parametrize("study", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_shipped_study_validates_and_points_at_the_schema(schema, study):
    text = study.read_text()
    assert text.splitlines()[0] == f"# yaml-language-server: $schema={SCHEMA_FILE}"
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(text))


def test_schema_types_each_methods_own_config(schema):
    v = jsonschema.Draft202012Validator(schema)
    base = yaml.safe_load((REPO / "studies" / "quickstart.yaml").read_text())
    assert base["run"]["method"]["name"] == "lwf"

    def errors(edit):
        data = copy.deepcopy(base)
        edit(data["run"]["method"])
        return list(v.iter_errors(data))

    assert not errors(lambda m: m["config"].update(distill_weight=2.0))
    # A knob of another method, a wrongly typed value, an unknown method: each rejected.
    assert errors(lambda m: m["config"].update(prompt_length=8))
    assert errors(lambda m: m["config"].update(distill_weight="strong"))
    assert errors(lambda m: m.update(name="no_such_method"))
    # DIKI's branch knows DIKI's fields (and their literals).
    diki = next(b for b in schema["$defs"]["MethodSpec"]["oneOf"] if b["title"] == "diki")
    ref = diki["properties"]["config"]["$ref"].rsplit("/", 1)[-1]
    assert {"prompt_length", "prompt_depth", "text_weight"} <= set(schema["$defs"][ref]["properties"])
