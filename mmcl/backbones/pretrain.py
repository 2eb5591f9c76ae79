"""Offline "pretrained" weights: a short contrastive pretraining on synthetic captions.

``pretrained: synthetic`` stands in for a web-scale checkpoint where nothing can be
downloaded. :func:`ensure_pretrained` trains the model CLIP-style on the base
distribution of :mod:`mmcl.data.synthetic` (image-caption pairs from a neutral domain
covering every task's concepts) and caches the weights on disk, so every trial, test and
process after the first one only loads a file.

The file is a plain ``{"state_dict": ...}`` checkpoint that open_clip's own loader
accepts (``create_model_and_transforms(name, pretrained=path)``). Its name carries a hash
of the model config, the recipe and the data generator version: changing any of them
trains a new file instead of reusing a stale one. Concurrent processes (Ray trials
started together) serialise on a lock file; the writer renames a finished temp file into
place, so a reader never sees a partial checkpoint.
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

from mmcl.spec import BackboneSpec, SpecError

log = logging.getLogger(__name__)

# The recipe: part of the cache key. About 1-2 minutes on 2 CPU cores for the tiny CLIP.
RECIPE: dict[str, Any] = {
    "steps": 500,
    "batch_size": 256,
    "lr": 2e-3,
    "min_lr_ratio": 0.05,
    "warmup_steps": 40,
    "weight_decay": 0.05,
    "grad_clip": 1.0,
    "seed": 0,
}


def cache_root(spec: BackboneSpec) -> Path:
    if spec.cache_dir:
        return Path(spec.cache_dir).expanduser()
    env = os.environ.get("MMCL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmcl"


def _model_config(name: str) -> dict[str, Any]:
    import open_clip

    from mmcl.backbones.clip import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        from mmcl.backbones.clip import _unknown_model

        raise _unknown_model(name)
    return cfg


def checkpoint_path(spec: BackboneSpec) -> Path:
    """Where the synthetic weights of ``spec.model`` live (whether or not they exist yet)."""
    from mmcl.data.synthetic import GENERATOR_VERSION

    payload = json.dumps(
        {"model": spec.model, "config": _model_config(spec.model), "recipe": RECIPE, "data": GENERATOR_VERSION},
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
    path = checkpoint_path(spec)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Another process may have finished it while we waited for the lock.
            if path.is_file():
                return path
            t0 = time.perf_counter()
            log.warning("pretraining %s on synthetic captions (%d steps, cached at %s)", spec.model, RECIPE["steps"], path)
            state = pretrain(spec.model, RECIPE)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            torch.save({"state_dict": state}, tmp)
            os.replace(tmp, path)
            log.warning("pretrained %s in %.1f s -> %s", spec.model, time.perf_counter() - t0, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on gains, biases, embeddings' scale-like 1-d tensors and the temperature.
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


def pretrain(model_name: str, recipe: dict[str, Any], log_every: int = 0) -> dict[str, torch.Tensor]:
    """Contrastive (CLIP) training on fresh synthetic batches; returns the state dict.

    Runs under its own RNG (the caller's torch seed is left untouched) so the weights
    depend only on the recipe.
    """
    import open_clip

    from mmcl.backbones.clip import MAX_LOGIT_SCALE, register_model_configs
    from mmcl.data.synthetic import pretraining_batch

    register_model_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = open_clip.create_model(model_name, pretrained=None)
        tokenizer = open_clip.get_tokenizer(model_name)
        size = model.visual.image_size
        image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        model.train()
        opt = torch.optim.AdamW(_param_groups(model, recipe["weight_decay"]), lr=recipe["lr"], betas=(0.9, 0.98), eps=1e-6)
        steps, warm, min_ratio = recipe["steps"], recipe["warmup_steps"], recipe["min_lr_ratio"]

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            prog = (step - warm) / max(1, steps - warm)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        g = torch.Generator().manual_seed(recipe["seed"])
        token_cache: dict[str, torch.Tensor] = {}
        for step in range(steps):
            batch = pretraining_batch(
                g, recipe["batch_size"], image_size, recipe.get("mention_prob", 0.5), recipe.get("group_size", 1)
            )
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
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
            if log_every and (step % log_every == 0 or step == steps - 1):
                log.warning("pretrain step %d/%d loss %.3f scale %.1f", step, steps, loss.item(), model.logit_scale.exp().item())
        model.eval()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
