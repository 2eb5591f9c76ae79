"""Cached offline models are a function of their recipe alone.

Each model is built twice, in two fresh processes whose global RNG histories and torch
thread counts differ (as a test, a trial or a benchmark script would leave them), into
fresh directories, and the weights are compared bit for bit. Short recipes (a few steps,
a small pool) keep this cheap; they go through the same code as the full ones.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

# Prints a hash of every weight, after disturbing the caller's RNG state and threads.
_PRELUDE = textwrap.dedent(
    """
    import hashlib, sys, torch
    prior_seed, threads, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(prior_seed)
    torch.rand(prior_seed + 1)  # a caller that drew before
    torch.set_num_threads(threads)

    def digest(state):
        h = hashlib.sha256()
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    """
)

_CLIP = _PRELUDE + textwrap.dedent(
    """
    from mmcl.backbones.pretrain import RECIPE, pretrain
    recipe = RECIPE.model_copy(update={"steps": 6, "pool_size": 256, "batch_size": 32, "warmup_steps": 2})
    before = torch.get_rng_state()
    state = pretrain("mmcl-tiny-clip", recipe)
    assert torch.equal(torch.get_rng_state(), before), "pretrain changed the caller's RNG"
    assert torch.get_num_threads() == threads, "pretrain changed the caller's threads"
    print(digest(state))
    """
)

_VLM = _PRELUDE + textwrap.dedent(
    """
    from safetensors.torch import load_file
    from mmcl.backbones.vlm import pretrain_tiny, save_tiny
    kind = sys.argv[4]
    save_tiny(kind, out)
    before = torch.get_rng_state()
    pretrain_tiny(out, steps=4, batch_size=8, n_images=64)
    assert torch.equal(torch.get_rng_state(), before), "pretrain_tiny changed the caller's RNG"
    print(digest(load_file(f"{out}/model.safetensors")))
    """
)


def _build(script: str, prior_seed: int, threads: int, out, *extra: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", script, str(prior_seed), str(threads), str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_tiny_clip_pretraining_depends_on_the_recipe_only(tmp_path):
    a = _build(_CLIP, 1, 1, tmp_path / "a")
    b = _build(_CLIP, 7, 2, tmp_path / "b")
    assert a == b


@pytest.mark.parametrize("kind", ["blip2", "llava"])
def test_tiny_vlm_pretraining_depends_on_the_recipe_only(tmp_path, kind):
    a = _build(_VLM, 1, 1, tmp_path / "a", kind)
    b = _build(_VLM, 7, 2, tmp_path / "b", kind)
    assert len(a) == len(hashlib.sha256().hexdigest())
    assert a == b
