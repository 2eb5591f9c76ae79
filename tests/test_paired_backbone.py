"""Paired encoders: real open_clip + transformers AST, saved and loaded by path; the spec."""

from __future__ import annotations

import pytest
import torch

from mmcl.spec import RunSpec, SpecError, load_study, parse_study

from .conftest import REPO
from .helpers import TINY_AST, tiny_paired_backbone


def _load(backbone: dict):
    from mmcl.backbones import load_backbone

    return load_backbone(RunSpec.model_validate({"backbone": backbone}).backbone)


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory):
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    d = tmp_path_factory.mktemp("ast")
    torch.manual_seed(1)
    model = ASTModel(ASTConfig(**TINY_AST))
    model.save_pretrained(d)
    ASTFeatureExtractor(num_mel_bins=TINY_AST["num_mel_bins"], max_length=TINY_AST["max_length"]).save_pretrained(d)
    return d, model


def test_ast_loads_by_path_with_its_weights(ast_dir):
    d, model = ast_dir
    bb = _load(tiny_paired_backbone(ast_path=str(d)))
    audio = bb.encoders["audio"]
    for (n, p), q in zip(model.named_parameters(), audio.model.parameters()):
        assert torch.equal(p, q), n
    assert not any(p.requires_grad for p in bb.parameters())
    assert audio.feature_extractor.num_mel_bins == TINY_AST["num_mel_bins"]
    assert bb.num_blocks == 2 and bb.block_layers("video") == [1, 2] and bb.block_layers("audio") == [0, 1]


def test_stepwise_encoders_match_the_libraries_forward(ast_dir):
    d, model = ast_dir
    bb = _load(tiny_paired_backbone(ast_path=str(d)))
    x = torch.randn(3, TINY_AST["max_length"], TINY_AST["num_mel_bins"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(bb.encoders["audio"](x), model(x).pooler_output)
        frames = torch.randn(2, 3, 3, 32, 32)
        visual = bb.encoders["video"].visual
        expected = visual(frames.flatten(0, 1)).reshape(2, 3, -1).mean(1)
        torch.testing.assert_close(bb.encoders["video"](frames), expected)


def test_adapters_start_as_the_frozen_encoders():
    from cl_methods._cma_model import PairedModel

    bb = _load(tiny_paired_backbone())
    model = PairedModel(bb, num_classes=4)
    batch = {"video": torch.randn(2, 2, 3, 32, 32), "audio": torch.randn(2, TINY_AST["max_length"], TINY_AST["num_mel_bins"])}
    with torch.no_grad():
        out = model(bb, batch)
        feats = bb.encode(batch)
        for m in feats:
            torch.testing.assert_close(out["u"][m], model.proj[m](feats[m]))


def test_missing_or_uncached_encoders_fail_clearly(tmp_path):
    with pytest.raises(SpecError, match=r"run\.backbone\.encoders\.audio\.path: .* not a saved transformers model"):
        _load(tiny_paired_backbone(ast_path=str(tmp_path / "nowhere")))
    with pytest.raises(SpecError, match=r"run\.backbone\.encoders\.audio\.path: cannot load .*without downloading"):
        _load(tiny_paired_backbone(ast_path="no-such-org/no-such-ast"))
    bad = tiny_paired_backbone()
    bad["encoders"]["video"]["pretrained"] = "no_such_tag"
    with pytest.raises(SpecError, match=r"run\.backbone\.encoders\.video\.pretrained"):
        _load(bad)


def test_spec_is_backward_compatible_and_checks_paired_blocks():
    run = load_study(REPO / "studies" / "quickstart.yaml").run
    assert run.backbone.kind == "open_clip" and run.backbone.model == "mmcl-tiny-clip"
    paired = RunSpec.model_validate({"backbone": tiny_paired_backbone()})
    assert RunSpec.model_validate(paired.model_dump()) == paired
    base = {"name": "x", "stages": [{"name": "a", "kind": "ablation"}]}
    with pytest.raises(SpecError, match=r"run\.backbone\.encoders: .*two or more modalities"):
        parse_study({**base, "run": {"backbone": {"kind": "paired", "encoders": {"video": {"kind": "open_clip_vision"}}}}})
    with pytest.raises(SpecError, match=r"run\.backbone\.encoders\.audio\.foo: unknown key"):
        b = tiny_paired_backbone()
        b["encoders"]["audio"]["foo"] = 1
        parse_study({**base, "run": {"backbone": b, "method": {"name": "cma"}}})
    with pytest.raises(SpecError, match=r"run\.backbone: 'kind' must be open_clip, blip2, llava or paired"):
        parse_study({**base, "run": {"backbone": {"kind": "audio"}}})
    with pytest.raises(SpecError, match=r"'paired_synthetic' needs run\.backbone\.kind: paired"):
        parse_study({**base, "run": {"benchmark": {"name": "paired_synthetic"}}})
    with pytest.raises(SpecError, match=r"'synthetic' needs run\.backbone\.kind: open_clip"):
        parse_study({**base, "run": {"backbone": tiny_paired_backbone(), "method": {"name": "cma"}}})


@pytest.mark.parametrize("name", ["cma_quickstart", "ave_cma_cil", "ave_cma_dil"])
def test_track_studies_validate_and_plan_without_data(name):
    from mmcl.study import describe_plan

    study = load_study(REPO / "studies" / f"{name}.yaml")
    text = describe_plan(study)
    assert "paired [" in text and "trial(s)" in text
