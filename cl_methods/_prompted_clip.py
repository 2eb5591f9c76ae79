"""Residual key/value prompts in a frozen open_clip CLIP (DIKI, Tang et al., ECCV 2024).

:class:`PromptedCLIP` adds, per task, ``P`` key and ``P`` value prompt tokens to the first
``L`` blocks of BOTH towers. The tokens live in the attention's projected space (width
``D`` = heads x head dim, split per head like the block's own keys and values). In a
prompted block the frozen attention is left unchanged and a second, prompt-only attention
is added before the output projection (DIKI's "residual attention")::

    O   = softmax(q k^T / sqrt(d) + mask) v          # the frozen block, as open_clip does it
    O_p = softmax(q k_p^T / sqrt(d)) v_p             # over the P prompt keys only, per head
    out = out_proj(O + w * O_p)

``w`` is per sample (a tensor [B]) or one number. Prompt keys have no mask: every text
token sees them, whatever the causal mask hides.

How it hooks in: open_clip's ``ResidualAttentionBlock.forward`` calls ``self.attention``;
while a prompted forward runs, each prompted block gets an instance attribute
``attention`` (a wrapper) that shadows the method, and loses it afterwards. The CLIP is
never copied, its weights stay frozen and shared, and nothing stays installed between
calls (a plain ``model.encode_image`` outside a prompted call is the untouched model).

Numerics: the wrapper computes ``O`` the way ``F.multi_head_attention_forward`` does (one
packed in-projection, ``F.scaled_dot_product_attention``, out-projection), so with zero
prompt values it is bit-identical to ``nn.MultiheadAttention``'s reference path. When no
input or weight needs grad (evaluation) PyTorch runs the frozen model through its fused
inference kernel instead, which rounds differently: there the two agree to float rounding
(about 1e-7 on normalised features). The tests pin both. Computing ``O`` here, rather than
calling the module and projecting ``O_p`` separately, costs no more matmuls than the
frozen block.

Capture (for methods that regularise attention, e.g. DAGR)::

    with prompted.capture() as cap:
        prompted.encode_image(images, sets=3)
    cap.image[0].attn_logits   # [B, H, N, N]

records, per prompted layer of each tower that ran, a :class:`LayerCapture`. Nothing
extra is computed when not capturing. Only the default ``ResidualAttentionBlock`` is
supported; models built with ``CustomResidualAttentionBlock`` (qk-norm, scaled cosine
attention ...) are rejected when the wrapper is built.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

Tower = Literal["image", "text"]


@dataclass
class LayerCapture:
    """One prompted block of one tower, from one forward (batch-first throughout).

    - ``tokens``: the block's output tokens, [B, N, D];
    - ``attn_logits``: token-token attention logits per head before the softmax, [B, H, N, N]:
      q k^T / sqrt(d_head) plus the block's mask (-inf where the text tower's causal mask
      hides a key);
    - ``prompt_logits``: query-to-prompt logits per head, q k_p^T / sqrt(d_head), [B, H, N, P]
      (P = 0 when the forward ran without prompts);
    - ``attn_probs``: ``softmax(attn_logits)`` per head in float32, [B, H, N, N]: the
      attention the block applied (a capturing forward computes it explicitly instead of
      through the fused kernel, so the logits it has to materialise anyway serve twice).

    Tensors keep their autograd graph when the forward had one (losses may use them); they
    are in the forward's compute dtype (bf16 / fp16 under autocast).
    """

    tower: Tower
    layer: int
    tokens: torch.Tensor
    attn_logits: torch.Tensor
    prompt_logits: torch.Tensor
    attn_probs: torch.Tensor


@dataclass
class Capture:
    """What :meth:`PromptedCLIP.capture` yields: per tower, the prompted layers in order.

    A new forward of a tower replaces that tower's list (the last image forward and the
    last text forward inside the ``with`` block are kept).
    """

    image: list[LayerCapture] = field(default_factory=list)
    text: list[LayerCapture] = field(default_factory=list)

    def tower(self, name: Tower) -> list[LayerCapture]:
        return self.image if name == "image" else self.text


class PromptSet(nn.Module):
    """One task's prompts: per tower, keys and values of shape [layers, P, width]."""

    def __init__(self, image_layers: int, image_width: int, text_layers: int, text_width: int, length: int):
        super().__init__()
        self.image_keys = nn.Parameter(torch.zeros(image_layers, length, image_width))
        self.image_values = nn.Parameter(torch.zeros(image_layers, length, image_width))
        self.text_keys = nn.Parameter(torch.zeros(text_layers, length, text_width))
        self.text_values = nn.Parameter(torch.zeros(text_layers, length, text_width))

    def reset_parameters(self, key_range: float = 1.0, generator: torch.Generator | None = None) -> None:
        """DIKI's initialisation: keys uniform(-key_range, key_range), values 0 (so an
        untrained set leaves the frozen model's outputs unchanged)."""
        with torch.no_grad():
            for keys in (self.image_keys, self.text_keys):
                # Drawn on the CPU so the same generator gives the same prompts on any device.
                u = torch.rand(keys.shape, generator=generator, dtype=torch.float32)
                keys.copy_((u * 2 - 1) * key_range)
            self.image_values.zero_()
            self.text_values.zero_()

    def keys(self, tower: Tower) -> nn.Parameter:
        return self.image_keys if tower == "image" else self.text_keys

    def values(self, tower: Tower) -> nn.Parameter:
        return self.image_values if tower == "image" else self.text_values


@dataclass
class _Active:
    """The prompts and weight of one tower forward, as the block wrappers read them."""

    keys: list[torch.Tensor] | None  # per prompted layer: [B or 1, P, D]
    values: list[torch.Tensor] | None
    weight: torch.Tensor | None  # [B or 1, 1, 1, 1]
    capture: list[LayerCapture] | None
    tower: Tower


def _check_block(block: nn.Module, where: str) -> None:
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    if isinstance(block, CustomResidualAttentionBlock):
        raise TypeError(
            f"{where}: CustomResidualAttentionBlock (qk-norm / scaled cosine attention / scaled heads) "
            "is not supported by the residual prompts; use a model built with open_clip's default "
            "ResidualAttentionBlock"
        )
    if not isinstance(block, ResidualAttentionBlock):
        raise TypeError(f"{where}: expected open_clip ResidualAttentionBlock, got {type(block).__name__}")
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        raise TypeError(f"{where}: expected a packed nn.MultiheadAttention self-attention")
    if not attn.batch_first:
        raise TypeError(f"{where}: the prompts need batch_first attention (open_clip >= 2.24 default)")
    if hasattr(block, "ln_1_kv"):
        raise TypeError(f"{where}: cross-attention blocks are not supported")


def _tower_blocks(clip: nn.Module) -> dict[Tower, nn.ModuleList]:
    """The resblocks of both towers of an open_clip ``CLIP`` or ``CustomTextCLIP``."""
    visual = getattr(clip, "visual", None)
    if visual is None or not hasattr(visual, "transformer"):
        raise TypeError("PromptedCLIP needs an open_clip CLIP with a ViT image tower (visual.transformer)")
    text = clip.text.transformer if hasattr(clip, "text") else getattr(clip, "transformer", None)
    if text is None:
        raise TypeError("PromptedCLIP needs an open_clip CLIP with a transformer text tower")
    return {"image": visual.transformer.resblocks, "text": text.resblocks}


def _additive_mask(mask: torch.Tensor | None, B: int, H: int, N: int, dtype: torch.dtype) -> torch.Tensor | None:
    """open_clip's masks as an additive float mask broadcastable to [B, H, N, N]."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:  # nn.MultiheadAttention semantics: True = may not attend
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    mask = mask.to(dtype)  # what open_clip's block does before calling the attention
    if mask.ndim == 3:  # [B * H, N, N] (padding masks)
        mask = mask.view(B, H, N, N)
    return mask


class PromptedCLIP(nn.Module):
    """Per-task residual prompts around a frozen open_clip CLIP (which it does not own).

    ``prompts[s]`` is the :class:`PromptSet` of task ``s``; the CLIP is kept outside the
    module tree, so ``state_dict`` / ``parameters`` / ``.to`` see the prompts only.
    ``depth`` is clipped per tower to the tower's number of blocks.
    """

    def __init__(self, clip: nn.Module, length: int, depth: int):
        super().__init__()
        if length < 1 or depth < 1:
            raise ValueError(f"prompt length and depth must be >= 1, got {length}, {depth}")
        object.__setattr__(self, "_clip", clip)  # not a submodule: shared, frozen, not saved
        self._blocks = _tower_blocks(clip)
        self.length = length
        self.depth: dict[Tower, int] = {t: min(depth, len(b)) for t, b in self._blocks.items()}
        for tower, blocks in self._blocks.items():
            for i, blk in enumerate(blocks[: self.depth[tower]]):
                _check_block(blk, f"{tower} tower block {i}")
        self.width: dict[Tower, int] = {t: b[0].attn.embed_dim for t, b in self._blocks.items()}
        self.heads: dict[Tower, int] = {t: b[0].attn.num_heads for t, b in self._blocks.items()}
        self.prompts = nn.ModuleList()
        self._capture: Capture | None = None

    @property
    def clip(self) -> nn.Module:
        return self._clip

    def __len__(self) -> int:
        return len(self.prompts)

    def new_prompt_set(self) -> PromptSet:
        return PromptSet(self.depth["image"], self.width["image"], self.depth["text"], self.width["text"], self.length)

    def add_prompt_set(
        self, key_range: float = 1.0, generator: torch.Generator | None = None, init_from: int | None = None
    ) -> PromptSet:
        """Append a set (keys uniform, values 0; or a copy of set ``init_from``)."""
        ps = self.new_prompt_set()
        if init_from is None:
            ps.reset_parameters(key_range, generator)
        else:
            ps.load_state_dict(self.prompts[init_from].state_dict())
        device = next(iter(self.prompts.parameters()), self._clip.logit_scale).device
        self.prompts.append(ps.to(device))
        return ps

    def resize(self, n: int) -> None:
        """Hold exactly ``n`` (zero-initialised) sets, before loading a state dict."""
        while len(self.prompts) > n:
            del self.prompts[-1]
        while len(self.prompts) < n:
            self.prompts.append(self.new_prompt_set().to(self._clip.logit_scale.device))

    def num_parameters_per_set(self) -> int:
        return sum(p.numel() for p in self.new_prompt_set().parameters())

    # ------------------------------------------------------------------ forwards
    def encode_image(
        self,
        images: torch.Tensor,
        sets: int | torch.Tensor | None,
        weight: float | torch.Tensor = 1.0,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Image features with prompt set ``sets`` (an index, or one index per sample;
        ``None`` = no prompts) scaled by ``weight`` (a number or one per sample)."""
        with self._installed("image", sets, weight, len(images)):
            return self._clip.encode_image(images, normalize=normalize)

    def encode_text(
        self,
        tokens: torch.Tensor,
        sets: int | torch.Tensor | None,
        weight: float | torch.Tensor = 1.0,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Text features, as :meth:`encode_image` (the causal mask is the model's own)."""
        with self._installed("text", sets, weight, len(tokens)):
            return self._clip.encode_text(tokens, normalize=normalize)

    @contextmanager
    def capture(self) -> Iterator[Capture]:
        """Record :class:`LayerCapture` s of every prompted layer during the ``with`` block."""
        previous, self._capture = self._capture, Capture()
        try:
            yield self._capture
        finally:
            self._capture = previous

    # ------------------------------------------------------------------ internals
    def _gather(self, tower: Tower, sets: int | torch.Tensor, B: int):
        """Per prompted layer, keys and values [1, P, D] (one set) or [B, P, D] (per sample)."""
        if torch.is_tensor(sets):
            if sets.ndim != 1 or len(sets) != B:
                raise ValueError(f"sets must hold one index per sample ({B}), got shape {tuple(sets.shape)}")
            uniq = torch.unique(sets)
            if len(uniq) == 1:  # one set for the whole batch: broadcast, no gather
                sets = int(uniq)
        if isinstance(sets, int):
            ps = self.prompts[sets]
            k, v = ps.keys(tower), ps.values(tower)
            return [k[i].unsqueeze(0) for i in range(len(k))], [v[i].unsqueeze(0) for i in range(len(v))]
        idx = sets.to(self.prompts[0].image_keys.device)
        K = torch.stack([ps.keys(tower) for ps in self.prompts])  # [S, L, P, D]
        V = torch.stack([ps.values(tower) for ps in self.prompts])
        return [K[:, i][idx] for i in range(K.shape[1])], [V[:, i][idx] for i in range(V.shape[1])]

    @contextmanager
    def _installed(self, tower: Tower, sets, weight, B: int):
        capture = self._capture.tower(tower) if self._capture is not None else None
        if sets is None and capture is None:  # the frozen model as it is
            yield
            return
        if capture is not None:
            capture.clear()
        keys = values = w = None
        if sets is not None:
            keys, values = self._gather(tower, sets, B)
            device = keys[0].device
            w = torch.as_tensor(weight, dtype=torch.float32, device=device)
            if w.ndim == 0:
                w = w.view(1, 1, 1, 1)
            elif w.shape == (B,):
                w = w.view(B, 1, 1, 1)
            else:
                raise ValueError(f"weight must be a number or one per sample ({B}), got shape {tuple(w.shape)}")
        state = _Active(keys, values, w, capture, tower)
        blocks = self._blocks[tower][: self.depth[tower]]
        hooks = []
        try:
            for i, blk in enumerate(blocks):
                # An instance attribute shadows ResidualAttentionBlock.attention for this call.
                blk.attention = partial(self._attention, blk, state, i)
                if capture is not None:
                    hooks.append(blk.register_forward_hook(partial(self._record_tokens, state, i)))
            yield
        finally:
            for blk in blocks:
                blk.__dict__.pop("attention", None)
            for h in hooks:
                h.remove()

    @staticmethod
    def _record_tokens(state: _Active, layer: int, module, args, output) -> None:
        state.capture[layer].tokens = output

    def _attention(
        self,
        blk: nn.Module,
        state: _Active,
        layer: int,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise RuntimeError("prompted blocks support self-attention only")
        attn = blk.attn
        B, N, D = q_x.shape
        H = attn.num_heads
        dh = D // H
        # As F.multi_head_attention_forward: one packed projection, then per-head views.
        qkv = F.linear(q_x, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.unflatten(-1, (3, H, dh)).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, dh]
        mask = _additive_mask(attn_mask, B, H, N, q_x.dtype)
        scale = dh**-0.5
        if state.capture is not None:
            # The capture needs the [B, H, N, N] logits; computing the attention from them
            # costs one softmax and one matmul, where the fused kernel would redo q k^T.
            logits = (q @ k.transpose(-1, -2)) * scale
            if mask is not None:
                logits = logits + mask.to(logits.dtype)  # keep the compute dtype under autocast
            probs = logits.float().softmax(-1)  # float32 like the fused kernel's accumulation
            out = probs.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, N, dh]
        prompt_logits = None
        if state.keys is not None:
            kp = state.keys[layer].unflatten(-1, (H, dh)).transpose(1, 2)  # [B|1, H, P, dh]
            vp = state.values[layer].unflatten(-1, (H, dh)).transpose(1, 2)
            prompt_logits = (q @ kp.transpose(-1, -2)) * scale  # [B, H, N, P]
            o_p = prompt_logits.softmax(-1).to(vp.dtype) @ vp
            out = out + state.weight * o_p
        out = F.linear(out.transpose(1, 2).reshape(B, N, D), attn.out_proj.weight, attn.out_proj.bias)
        if state.capture is not None:
            if prompt_logits is None:
                prompt_logits = q.new_zeros(B, H, N, 0)
            # tokens are filled in by the block's forward hook once the block returns
            entry = LayerCapture(state.tower, layer, q.new_empty(0), logits, prompt_logits, probs)
            if len(state.capture) == layer:
                state.capture.append(entry)
            else:  # the same block ran again inside one forward (not in open_clip's CLIP)
                state.capture[layer] = entry
        return out
