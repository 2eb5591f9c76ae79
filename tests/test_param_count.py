"""`mmcl plan`'s trainable-parameter counts (mmcl.param_count) against the papers' figures.

Every count here comes from the method's real setup / before_task on the study's backbone
built from its config on the meta device; each test checks it against a formula written
from the model dims and the method's config, and against the paper where it gives one.
"""

from __future__ import annotations

import json

import pytest

from mmcl.backbones.shipped_configs import match_shipped, shipped_config
from mmcl.param_count import count_run, describe_counts
from mmcl.spec import SpecError, apply_overrides, load_study
from mmcl.study import describe_plan

from .conftest import REPO

STUDIES = REPO / "studies"


def _run(study: str, **overrides):
    run = load_study(STUDIES / f"{study}.yaml").run
    return apply_overrides(run, overrides, where="test") if overrides else run


# --------------------------------------------------------------------------- DIKI / DAGR on CLIP ViT-B/16


def test_diki_on_vit_b16_is_163840_a_task_and_1_8m_for_mtils_11():
    # DIKI (MTIL): 8 prompt tokens (keys and values) in the first 8 blocks of both towers.
    run = _run("mtil_dagr", **{"method.name": "diki", "method.config": {"prompt_length": 8, "prompt_depth": 8}})
    c = count_run(run)
    per_task = 8 * 8 * 2 * 768 + 8 * 8 * 2 * 512  # layers x tokens x (k, v) x width, image + text
    assert per_task == 163_840
    assert c.per_task == [163_840] * 11 and c.max_per_task == 163_840
    assert c.total == 11 * 163_840 == 1_802_240  # DIKI's "1.8M" for the 11 tasks
    assert c.backbone_params == 149_620_737 and c.growth is None  # open_clip ViT-B-16


def test_mtil_dagr_plan_prints_the_counts():
    text = describe_plan(load_study(STUDIES / "mtil_dagr.yaml"), params=True)
    assert "trainable parameters" in text
    assert "dagr [run block; search (search, at the run block's values); ablation: full, no_graph" in text
    assert "163,840 a task; 1,802,240 in all over the 11 task(s)" in text
    assert "trainable parameters" not in describe_plan(load_study(STUDIES / "mtil_dagr.yaml"))


# --------------------------------------------------------------------------- ECA on BLIP-2 OPT-2.7B


def test_eca_on_blip2_opt_2_7b_is_12_29m():
    from tests.test_eca import eca_trainable_count

    c = count_run(_run("coco_eca"))  # /data/models/blip2-opt-2.7b is absent: the shipped config
    assert "blip2-opt-2.7b.json" in c.backbone and c.backbone_params == 3_744_679_936
    expected = eca_trainable_count(12, 2, 768, 30, 512, 1408, 32, 2560)
    assert c.per_task == [expected] * 5 and expected == 12_290_972
    assert abs(c.max_per_task - 12.29e6) / 12.29e6 < 0.005  # the paper's 12.29M
    # In all: one adapter bank (no FeDEx growth counted), every task's key + queries, the projection.
    adapters, key_queries, projection = 10_296_348, 1408 + 32 * 768, 768 * 2560 + 2560
    assert c.total == adapters + 5 * key_queries + projection
    assert c.growth is not None and "FeDEx" in c.growth and "10,296,348" in c.growth
    always = count_run(_run("coco_eca", **{"method.expansion": "always"}))
    assert always.per_task == [expected] * 5 and always.growth is None
    assert always.total == 5 * adapters + 5 * key_queries + projection


# --------------------------------------------------------------------------- DGG on LLaVA-1.5-7B


def test_dgg_lora_rank_128_on_llava_1_5_7b_llm():
    run = _run("vqa_dgg_llava")
    cfg = run.method.config
    assert cfg["params"] == "lora" and cfg["lora"]["rank"] == 128  # DGG's setting
    c = count_run(run)
    assert c.backbone_params == 7_063_427_072
    # LoRA A (r x in) and B (out x r) on every decoder linear the default targets name that
    # Llama has: q, k, v, o (4096 -> 4096), gate, up (4096 -> 11008), down (11008 -> 4096).
    text = shipped_config("llava-1.5-7b")["text_config"]
    h, f, layers, r = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], 128
    per_layer = 4 * r * (h + h) + 2 * r * (h + f) + r * (f + h)
    assert layers * per_layer == 319_815_680  # LLaVA's own LoRA recipe: r = 128 on all LLM linears
    assert c.per_task == [319_815_680] * 10 and c.total == 319_815_680  # one LoRA for the sequence
    text = "\n".join(describe_counts(load_study(STUDIES / "vqa_dgg_llava.yaml")))
    assert "gen_dgg [run block; main: full, replay_only, ghat_only" in text and "319,815,680 a task" in text


# --------------------------------------------------------------------------- CMA on ViT-B/16 + AST


def _cma_count(experts: int, r: int, joint: int, widths: dict[str, int], out_dims: dict[str, int], blocks: int) -> int:
    """CMA's model without its head, from its config: per block a gate and ``experts``
    cross-modal experts; per modality a projection to the joint space; the fusion MLP."""
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    expert = sum(lin(d, r) + lin(r, d) + lin(r, r, False) + lin(r, 2 * r, False) for d in widths.values())
    block = lin(sum(widths.values()), experts) + experts * expert
    proj = sum(lin(d, joint) for d in out_dims.values())
    fusion = lin(joint * len(widths), joint) + lin(joint, joint)
    return blocks * block + proj + fusion


@pytest.mark.parametrize("protocol", ["cil", "dil"])
def test_cma_on_clip_vit_b16_and_ast(protocol):
    run = _run(f"ave_cma_{protocol}")
    cfg = run.method.config
    c = count_run(run)
    assert c.backbone_params == 86_389_248 + 85_990_656  # ViT-B/16 image tower + AST encoder
    # ViT-B/16: 12 blocks 768 wide, output 512; AST: 12 blocks 768 wide, output 768.
    body = _cma_count(cfg["experts"], cfg["bottleneck"], cfg["joint_dim"], {"video": 768, "audio": 768},
                      {"video": 512, "audio": 768}, 12)  # fmt: skip
    head = lambda n: cfg["joint_dim"] * n + n  # noqa: E731 - one chunk of n classes
    if protocol == "cil":  # 7 tasks of 4 classes: the head grows a chunk a task
        assert c.per_task == [body + t * head(4) for t in range(1, 8)]
    else:  # one chunk of all 28 classes
        assert c.per_task == [body + head(28)] * len(c.per_task)
    assert c.total == body + (7 * head(4) if protocol == "cil" else head(28))
    r = cfg["bottleneck"]
    expert = 2 * (768 * r + r + r * 768 + 768 + r * r + r * 2 * r) + (768 + 768) + 1  # its gate row too
    assert c.growth is not None and f"{expert:,}" in c.growth
    no_freeze = count_run(apply_overrides(run, {"method.freeze": False}, where="test"))
    assert no_freeze.per_task == c.per_task and no_freeze.growth is None


# --------------------------------------------------------------------------- configs and errors


def test_shipped_configs_are_the_papers_models():
    assert match_shipped("blip2", "/data/models/blip2-opt-2.7b") == "blip2-opt-2.7b"
    assert match_shipped("blip2", "Salesforce/blip2-opt-2.7b") == "blip2-opt-2.7b"
    assert match_shipped("llava", "llava-hf/llava-1.5-7b-hf") == "llava-1.5-7b"
    assert match_shipped("ast", "MIT/ast-finetuned-audioset-10-10-0.4593") == "ast-finetuned-audioset-10-10-0.4593"
    assert match_shipped("blip2", "Salesforce/blip2-opt-6.7b") is None
    assert match_shipped("llava", "/models/blip2-opt-2.7b") is None


def test_a_local_model_dir_is_read_instead_of_the_shipped_config(tmp_path):
    cfg = shipped_config("llava-1.5-7b")
    cfg["text_config"]["num_hidden_layers"] = 2  # not the shipped shape: the count must follow it
    d = tmp_path / "llava-1.5-7b-hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    c = count_run(_run("vqa_dgg_llava", **{"backbone.path": str(d)}))
    assert c.backbone == str(d / "config.json")
    assert c.per_task[0] == 319_815_680 // 16


def test_bad_backbones_say_which_key_and_how_to_fix(tmp_path):
    with pytest.raises(SpecError, match=r"run\.backbone\.path: '/nowhere/my-model' is not a directory.*config\.json"):
        count_run(_run("vqa_dgg_llava", **{"backbone.path": "/nowhere/my-model"}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"run\.backbone\.path: .*empty has no config\.json"):
        count_run(_run("vqa_dgg_llava", **{"backbone.path": str(tmp_path / "empty")}))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match=r"run\.backbone\.path: cannot read .*config\.json"):
        count_run(_run("vqa_dgg_llava", **{"backbone.path": str(tmp_path / "bad")}))
    (tmp_path / "blip2").mkdir()
    (tmp_path / "blip2" / "config.json").write_text(json.dumps(shipped_config("blip2-opt-2.7b")))
    with pytest.raises(SpecError, match=r"run\.backbone\.path: .*config\.json holds a 'blip-2' model, not 'llava'"):
        count_run(_run("vqa_dgg_llava", **{"backbone.path": str(tmp_path / "blip2")}))
    # In a plan the failure is a line, not a failed plan.
    study = load_study(STUDIES / "vqa_dgg_llava.yaml")
    study.run.backbone.path = "/nowhere/my-model"
    text = describe_plan(study, params=True)
    assert "total " in text and "not counted: run.backbone.path: '/nowhere/my-model'" in text


def test_plan_cli_prints_counts_unless_told_not_to(capsys):
    from mmcl.cli import main

    assert main(["plan", str(STUDIES / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert "backbone open_clip mmcl-tiny-clip config" in out and "lwf [run block" in out
    assert main(["plan", "--no-params", str(STUDIES / "quickstart.yaml")]) == 0
    assert "trainable parameters" not in capsys.readouterr().out


def test_a_clip_whose_text_tower_comes_from_the_hub_is_refused_not_downloaded():
    from mmcl.param_count import _meta_clip

    with pytest.raises(SpecError, match="Hugging Face text tower.*--no-params"):
        _meta_clip("roberta-ViT-B-32", "run.backbone.model")
