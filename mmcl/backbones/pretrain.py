"""Offline "pretrained" weights: a short contrastive pretraining on synthetic captions.

``pretrained: synthetic`` stands in for a web-scale checkpoint where nothing can be
downloaded. :func:`ensure_pretrained` trains the model CLIP-style on the base
distribution of :mod:`mmcl.data.synthetic` (image-caption pairs from a neutral domain
covering every task's concepts) and caches the weights on disk, so every trial, test and
process after the first one only loads a file.

The file is a plain ``{"state_dict": ...}`` checkpoint that open_clip's own loader
accepts (``create_model_and_transforms(name, pretrained=path)``). Its name carries a hash
of the model config, the recipe and the data generator version: changing any of them
trains a new file instead of reusing a stale one. Concurrent callers (Ray trials started
together, in one process or several) serialise on an ``fcntl`` lock file; the writer
renames a finished temp file into place, so a reader never sees a partial checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from mmcl.spec import BackboneSpec, SpecError

log = logging.getLogger(__name__)


class PretrainRecipe(BaseModel):
    """How the synthetic weights are made. Every field is part of the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=900, ge=1)
    batch_size: int = Field(default=128, ge=2)
    # Batches are drawn from a pool rendered once (see mmcl.data.synthetic.PretrainPool).
    pool_size: int = Field(default=16384, ge=2)
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    # How often a caption names each factor. Colour is the easiest factor by far: named
    # often, it solves most of a batch alone and the spatial factors learn slowly.
    mention_prob: dict[str, float] = Field(
        default_factory=lambda: {
            "shape": 0.6, "color": 0.3, "pattern": 0.5, "count": 0.4, "size": 0.6, "position": 0.7,
        }
    )  # fmt: skip
    # Share of one-object scenes (size and position exist only for those).
    p_single: float = Field(default=0.5, ge=0, le=1)
    # Torch intra-op threads, whatever the machine has: float reductions split over a
    # different number of threads round differently (1 and 2 threads give different
    # weights, measured), so the thread count is part of the recipe, not of the machine.
    threads: int = Field(default=2, ge=1)


RECIPE = PretrainRecipe()


def recipe_seed() -> int:
    """Seed of every offline model's recipe (tiny CLIP, tiny BLIP-2 / LLaVA): 0, or
    $MMCL_RECIPE_SEED to measure how much a figure owes to one pretrained model (each
    seed is cached apart: the seed is part of the cache key)."""
    raw = os.environ.get("MMCL_RECIPE_SEED", "0").strip() or "0"
    try:
        return int(raw)
    except ValueError:
        raise SpecError(f"MMCL_RECIPE_SEED={raw!r}: not an integer; fix: unset it or give a seed such as 1") from None


def current_recipe() -> PretrainRecipe:
    """The recipe pretraining uses now: :data:`RECIPE` with :func:`recipe_seed`."""
    seed = recipe_seed()
    return RECIPE if seed == RECIPE.seed else RECIPE.model_copy(update={"seed": seed})
# 900 steps of batch 128: ~2 min on 2 idle cores. Shorter runs (400 steps) leave shape and
# position near chance zero-shot; the tasks then cannot be learned in an epoch either.


def cache_root(spec: BackboneSpec) -> Path:
    if spec.cache_dir:
        return Path(spec.cache_dir).expanduser()
    env = os.environ.get("MMCL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmcl"


def _model_config(name: str) -> dict[str, Any]:
    import open_clip

    from mmcl.backbones.clip import register_model_configs, unknown_model_error

    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise unknown_model_error(name)
    return cfg


def checkpoint_path(spec: BackboneSpec, recipe: PretrainRecipe | None = None) -> Path:
    """Where the synthetic weights of ``spec.model`` live (whether or not they exist yet)."""
    from mmcl.data.synthetic import GENERATOR_VERSION

    recipe = recipe or current_recipe()
    payload = json.dumps(
        {
            "model": spec.model,
            "config": _model_config(spec.model),
            "recipe": recipe.model_dump(),
            "data": GENERATOR_VERSION,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return cache_root(spec) / f"{spec.model}-synthetic-{digest}.pt"


def ensure_pretrained(spec: BackboneSpec) -> Path:
    """Path of ``spec.model``'s synthetic-pretrained checkpoint, training it if missing."""
    if spec.pretrained != "synthetic":
        raise SpecError(
            f"run.backbone.pretrained: only 'synthetic' weights are made locally, got {spec.pretrained!r}"
        )
    recipe = current_recipe()
    path = checkpoint_path(spec, recipe)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as lock:
        # Blocks while another process (or thread) trains; it then finds the file below.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.is_file():
                return path
            log.warning(
                "pretraining %s on synthetic captions (%d steps, %d threads; once per machine) -> %s",
                spec.model, recipe.steps, recipe.threads, path,
            )  # fmt: skip
            t0 = time.perf_counter()
            state = pretrain(spec.model, recipe, progress=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            try:
                torch.save({"state_dict": state}, tmp)
                os.replace(tmp, path)  # atomic: readers see no file or the whole file
            finally:
                tmp.unlink(missing_ok=True)
            log.warning("pretrained %s in %.1f s", spec.model, time.perf_counter() - t0)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on gains, biases, embeddings and the temperature (CLIP's convention).
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in n or "embedding" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def multi_positive_clip_loss(logits: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where every true (image, caption) pair is a positive.

    Captions name only some factors ("a red thing."), so many captions in a batch truly
    describe an image; the plain CLIP loss would push those apart as negatives. The target
    of each row is uniform over its matches (the diagonal always matches).
    """
    m = matches.float()
    i2t = torch.sum(-(m / m.sum(1, keepdim=True)) * F.log_softmax(logits, 1), 1).mean()
    t2i = torch.sum(-(m.T / m.T.sum(1, keepdim=True)) * F.log_softmax(logits.T, 1), 1).mean()
    return 0.5 * (i2t + t2i)


def pretrain(
    model_name: str, recipe: PretrainRecipe = RECIPE, log_every: int = 0, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Contrastive (CLIP) training of a randomly initialised model; returns its state dict.

    The weights are a function of the recipe alone: every draw comes from generators
    seeded by ``recipe.seed`` (the global one is forked and seeded, so dropout or any
    other draw of torch's global generator is too, and the caller's state is untouched),
    and torch runs on ``recipe.threads`` threads (restored afterwards). ``progress`` shows a
    bar (mmcl/progress.py): minutes of work a new user would otherwise sit through blind.
    """
    import open_clip

    from mmcl.backbones.clip import MAX_LOGIT_SCALE, register_model_configs
    from mmcl.data.synthetic import pretraining_pool, torch_threads
    from mmcl.progress import work_bar

    register_model_configs()
    with torch.random.fork_rng(devices=[]), torch_threads(recipe.threads):
        torch.manual_seed(recipe.seed)
        model = open_clip.create_model(model_name, pretrained=None)
        tokenizer = open_clip.get_tokenizer(model_name)
        size = model.visual.image_size
        image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        g = torch.Generator().manual_seed(recipe.seed)
        pool = pretraining_pool(g, recipe.pool_size, image_size, recipe.p_single)

        model.train()
        opt = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
        steps, warm, min_ratio = recipe.steps, recipe.warmup_steps, recipe.min_lr_ratio

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            prog = (step - warm) / max(1, steps - warm)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        token_cache: dict[str, torch.Tensor] = {}
        order = torch.randperm(len(pool), generator=g)
        cursor = 0
        with work_bar(steps, f"pretraining the tiny {model_name} (once per machine)", show=progress) as bar:
            for step in range(steps):
                if cursor + recipe.batch_size > len(order):
                    order, cursor = torch.randperm(len(pool), generator=g), 0
                batch = pool.batch(order[cursor : cursor + recipe.batch_size], g, recipe.mention_prob)
                cursor += recipe.batch_size
                # Captions repeat a lot (a few hundred distinct short ones): tokenise each once.
                missing = [c for c in dict.fromkeys(batch.captions) if c not in token_cache]
                if missing:
                    for c, row in zip(missing, tokenizer(missing)):
                        token_cache[c] = row
                tokens = torch.stack([token_cache[c] for c in batch.captions])
                img = model.encode_image(batch.images, normalize=True)
                txt = model.encode_text(tokens, normalize=True)
                logits = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * img @ txt.T
                loss = multi_positive_clip_loss(logits, batch.matches())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                opt.step()
                sched.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
                if log_every and (step % log_every == 0 or step == steps - 1):
                    log.warning("pretrain step %d/%d loss %.3f scale %.1f", step, steps, loss.item(), model.logit_scale.exp().item())
                bar.update()
        model.eval()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
