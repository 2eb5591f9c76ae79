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

_BUILD = _PRELUDE + textwrap.dedent(
    """
    from safetensors.torch import load_file
    from mmcl.backbones.pretrain import RECIPE, pretrain
    from mmcl.backbones.vlm import pretrain_tiny, save_tiny

    recipe = RECIPE.model_copy(update={"steps": 6, "pool_size": 256, "batch_size": 32, "warmup_steps": 2})
    before = torch.get_rng_state()
    print("clip", digest(pretrain("mmcl-tiny-clip", recipe)))
    for kind in ("blip2", "llava"):
        save_tiny(kind, f"{out}/{kind}")
        pretrain_tiny(f"{out}/{kind}", steps=4, batch_size=8, n_images=64)
        print(kind, digest(load_file(f"{out}/{kind}/model.safetensors")))
    assert torch.equal(torch.get_rng_state(), before), "pretraining changed the caller's RNG"
    assert torch.get_num_threads() == threads, "pretraining changed the caller's threads"
    """
)


def _build(prior_seed: int, threads: int, out) -> dict[str, str]:
    r = subprocess.run(
        [sys.executable, "-c", _BUILD, str(prior_seed), str(threads), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(line.split() for line in r.stdout.strip().splitlines() if line.split()[0] in ("clip", "blip2", "llava"))


def test_offline_models_depend_on_their_recipe_only(tmp_path):
    a = _build(1, 1, tmp_path / "a")
    b = _build(7, 2, tmp_path / "b")
    assert set(a) == {"clip", "blip2", "llava"}
    assert all(len(v) == len(hashlib.sha256().hexdigest()) for v in a.values())
    assert a == b
