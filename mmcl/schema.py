"""The JSON Schema of a study file, for editors (``mmcl schema > studies/study.schema.json``).

Built from the pydantic models themselves, so it cannot drift from what ``mmcl validate``
accepts: :class:`mmcl.spec.StudySpec`, with ``run.method`` narrowed to one branch per
registered method whose ``config`` is that method's own typed ``Config`` model (an editor
then completes and checks every method knob). Shipped studies point at the committed copy
with a ``# yaml-language-server: $schema=study.schema.json`` first line (VS Code's YAML
extension, and any editor speaking the YAML language server).
"""

from __future__ import annotations

from typing import Any

SCHEMA_FILE = "study.schema.json"


def study_schema() -> dict[str, Any]:
    """The study file's JSON Schema (draft 2020-12, as pydantic writes it)."""
    from pydantic.json_schema import models_json_schema

    from cl_methods import get_method_class, registered_methods
    from mmcl.spec import StudySpec

    names = registered_methods()
    configs = [get_method_class(n).Config for n in names]
    refs, schema = models_json_schema(
        [(StudySpec, "validation"), *[(c, "validation") for c in configs]], ref_template="#/$defs/{model}"
    )
    defs = schema["$defs"]
    branches = []
    for name, cfg in zip(names, configs):
        branches.append({
            "type": "object",
            "title": name,
            "properties": {"name": {"const": name}, "config": refs[(cfg, "validation")]},
            "required": ["name"],
            "additionalProperties": False,
        })  # fmt: skip
    method = defs["MethodSpec"]
    # One branch per method: the name picks the branch, the branch types the config.
    defs["MethodSpec"] = {"title": method.get("title", "MethodSpec"), "description": method.get("description", ""),
                          "oneOf": branches}  # fmt: skip
    top = refs[(StudySpec, "validation")]["$ref"].rsplit("/", 1)[-1]
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "mmcl-studies study file",
           **defs[top], "$defs": defs}  # fmt: skip
    return out


__all__ = ["SCHEMA_FILE", "study_schema"]
