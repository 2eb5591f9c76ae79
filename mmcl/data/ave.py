"""AVE and generic paired manifests (placeholder while the decoder lands)."""

from __future__ import annotations

from pydantic import Field

from mmcl.data.paired import ProtocolOptions, cil_task_names
from mmcl.spec import SpecError

AVE_NUM_CLASSES = 28


class AVEOptions(ProtocolOptions):
    classes_per_task: int = Field(default=4, ge=1)
    domains: list[str] = Field(default_factory=lambda: ["clean", "white", "hum", "babble"])


class ManifestOptions(ProtocolOptions):
    manifest: str = "manifest.csv"
    domains: list[str] | None = None


def task_names(options: dict) -> list[str]:
    opts = AVEOptions.model_validate(options)
    return cil_task_names(AVE_NUM_CLASSES, opts.classes_per_task) if opts.protocol == "cil" else list(opts.domains)


def manifest_task_names(options: dict) -> list[str]:
    raise SpecError("paired_manifest: not implemented yet")


def build_ave(options, image_size, seed, preprocess=None, root=None):
    raise SpecError("ave: not implemented yet")


def build_manifest(options, image_size, seed, preprocess=None, root=None):
    raise SpecError("paired_manifest: not implemented yet")
