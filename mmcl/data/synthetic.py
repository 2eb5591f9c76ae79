"""``synthetic``: an offline, generated stand-in for MTIL-style benchmarks.

Every image is a small scene: one to four objects of one shape and one colour, drawn
over a patterned background. A scene has six factors: shape, colour, background
pattern, object count, object size and position. Each task labels ONE factor and draws
its images from its own visual *domain* (background style, palette, noise, blur,
contrast, pixelation, inversion), so tasks differ both in what a label means and in
what the pixels look like, as the datasets of MTIL do.

Why tasks forget: every task's images vary in all factors, but each task's loss only
rewards one of them. Fine-tuning the image tower on "colors" makes the features
invariant to shape, count ... so the text heads of earlier tasks stop matching.

A separate *base* distribution (neutral domain, every factor random, captions naming a
random subset of factors such as "two red circles on a striped background") is what the
tiny CLIP is pretrained on (:mod:`mmcl.backbones.pretrain`), so the pretrained model
recognises every task's concepts zero-shot while each task's domain is still a shift.

Everything is generated with torch on the CPU from explicit generators: the same
options give bit-identical tensors, and the whole default benchmark takes about a second.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from mmcl.data.base import Benchmark, Task, TensorTaskDataset

# Bump whenever rendering, captions or task definitions change: the pretrained-weights
# cache key includes it, so a stale checkpoint is never reused with new data.
GENERATOR_VERSION = "synthetic-v1"

# open_clip's OPENAI_DATASET_MEAN / STD (copied: importing open_clip here would make
# building data depend on it and cost an import).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# --------------------------------------------------------------------------- factors

SHAPES = ["circle", "square", "triangle", "cross", "ring"]
SHAPE_PLURALS = ["circles", "squares", "triangles", "crosses", "rings"]
COLORS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
COLOR_RGB = [
    (0.90, 0.15, 0.15),
    (0.15, 0.80, 0.20),
    (0.15, 0.30, 0.95),
    (0.95, 0.90, 0.15),
    (0.90, 0.20, 0.90),
    (0.10, 0.85, 0.90),
]
PATTERNS = ["plain", "striped", "checkered", "dotted"]
COUNTS = ["one", "two", "three", "four"]
SIZES = ["tiny", "small", "large", "huge"]
# Radii in pixels of a 32-pixel image (scaled with the image size).
SIZE_RADII = [4.0, 6.0, 9.0, 12.0]
MULTI_RADIUS = 5.0  # objects of a multi-object scene share one size
# Where a single object sits: near the middle of an edge (order of POSITIONS) or, index 4,
# the centre (no task labels it). One word per place: two-word places ("top left") shared
# words between classes and the tiny text tower could not tell them apart in pretraining.
POSITIONS = ["left", "right", "top", "bottom"]
CENTER = 4
EDGE_XY = [(0.2, 0.5), (0.8, 0.5), (0.5, 0.2), (0.5, 0.8)]
# Several objects take distinct quadrants.
QUADRANT_XY = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]

FACTOR_VALUES: dict[str, list[str]] = {
    "shape": SHAPES,
    "color": COLORS,
    "pattern": PATTERNS,
    "position": POSITIONS,
    "count": COUNTS,
    "size": SIZES,
}


@dataclass(frozen=True)
class Domain:
    """How a task's pixels look. Applied after the scene is drawn."""

    description: str
    bg: tuple[float, float, float]  # background base colour
    bg_jitter: float  # per-image brightness jitter of the background
    pattern_amp: float  # contrast of the background pattern
    noise: float  # std of additive Gaussian pixel noise
    blur: float  # Gaussian blur sigma in pixels (0 = none)
    contrast: float = 1.0  # global contrast around mid-grey
    saturation: float = 1.0  # 0 = greyscale
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pixelate: int = 1  # block size of a down/up-sampling (1 = none)
    invert: bool = False


BASE_DOMAIN = Domain("neutral grey background, light noise", (0.5, 0.5, 0.5), 0.12, 0.3, 0.03, 0.0)


@dataclass(frozen=True)
class TaskDef:
    name: str
    factor: str  # which scene factor is the label
    templates: tuple[str, ...]
    domain: Domain


TASKS: tuple[TaskDef, ...] = (
    TaskDef(
        "shapes",
        "shape",
        ("a photo of a {}.", "a {} in the dark.", "a drawing of a {}."),
        Domain("night: dark blue background, cold tint, noise", (0.10, 0.12, 0.22), 0.04, 0.08, 0.06, 0.0,
               tint=(0.8, 0.9, 1.15)),
    ),
    TaskDef(
        "colors",
        "color",
        ("a photo of something {}.", "a {} object.", "the color {}."),
        Domain("paper: warm light background, soft blur, low contrast", (0.92, 0.87, 0.74), 0.04, 0.10, 0.02,
               0.8, contrast=0.85),
    ),
    TaskDef(
        "patterns",
        "pattern",
        ("a shape on a {} background.", "a {} texture.", "a photo with a {} background."),
        Domain("negative: inverted colours, strong pattern", (0.45, 0.45, 0.45), 0.10, 0.30, 0.04, 0.0,
               invert=True),
    ),
    TaskDef(
        "positions",
        "position",
        ("an object on the {}.", "a shape at the {} of the picture.", "a photo of something on the {} side."),
        Domain("noisy: heavy sensor noise, washed-out contrast", (0.40, 0.40, 0.40), 0.08, 0.12, 0.12, 0.0,
               contrast=0.7),
    ),
    TaskDef(
        "counts",
        "count",
        ("a photo of {} objects.", "{} shapes.", "a picture showing {} things."),
        Domain("sepia: near-greyscale, dark background, slight blur", (0.08, 0.08, 0.08), 0.04, 0.06, 0.03, 0.5,
               saturation=0.35, tint=(1.12, 1.0, 0.78)),
    ),
    TaskDef(
        "sizes",
        "size",
        ("a {} object.", "a photo of a {} shape.", "something {}."),
        Domain("pixelated: green-tinted, 2x2 blocks, high contrast", (0.55, 0.68, 0.52), 0.06, 0.12, 0.03, 0.0,
               contrast=1.25, pixelate=2),
    ),
)

TASK_NAMES: list[str] = [t.name for t in TASKS]


class SyntheticOptions(BaseModel):
    """``run.benchmark.options`` of the ``synthetic`` benchmark."""

    model_config = ConfigDict(extra="forbid")

    n_train_per_class: int = Field(default=80, ge=1)
    n_test_per_class: int = Field(default=40, ge=1)
    # Seed of the generated images; independent of the run's (trial's) seed so that every
    # trial of a study sees the same data.
    data_seed: int = 0
    # None = the backbone's input size (32 for the tiny CLIP).
    image_size: int | None = Field(default=None, ge=8)
    # Share of each task's images (train and test) rendered in a domain drawn uniformly
    # from all six tasks' domains instead of the task's own. 0 (default): every task has its
    # own look, so a task-identity model on frozen image features routes almost perfectly.
    # 1: all tasks share one image distribution and only the label factor tells them
    # apart, as MTIL datasets that overlap in content do (Caltech101 / ImageNet-like
    # photos, Flowers / Food close-ups): identity-routed methods (DIKI, DAGR) then apply a
    # later task's prompts to earlier tasks' samples, and that is where they forget.
    domain_mix: float = Field(default=0.0, ge=0.0, le=1.0)


# --------------------------------------------------------------------------- scenes


@dataclass
class Scenes:
    """Factor indices of N scenes (all LongTensor[N])."""

    shape: torch.Tensor
    color: torch.Tensor
    pattern: torch.Tensor
    count: torch.Tensor  # number of objects minus one (index into COUNTS)
    size: torch.Tensor  # index into SIZES; -1 when several objects (they use MULTI_RADIUS)
    position: torch.Tensor  # edge index (POSITIONS), CENTER, or -1 when several objects

    def __len__(self) -> int:
        return len(self.shape)

    def select(self, idx: torch.Tensor) -> "Scenes":
        return Scenes(self.shape[idx], self.color[idx], self.pattern[idx], self.count[idx], self.size[idx], self.position[idx])


def _randint(g: torch.Generator, high: int, n: int) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=g)


def sample_scenes(
    g: torch.Generator,
    n: int,
    factor: str | None = None,
    labels: torch.Tensor | None = None,
    p_single: float | None = None,
) -> Scenes:
    """Random scenes; when ``factor`` is given, that factor takes the values ``labels``.

    ``p_single``: probability of a one-object scene (None: counts are uniform).

    The constraints keep every scene renderable in 32 pixels: several objects are small
    and sit in distinct quadrants; a single object near an edge is at most "large";
    a "huge" object is centred.
    """
    shape = _randint(g, len(SHAPES), n)
    color = _randint(g, len(COLORS), n)
    pattern = _randint(g, len(PATTERNS), n)
    count = _randint(g, len(COUNTS), n)
    if p_single is not None:
        count = torch.where(torch.rand(n, generator=g) < p_single, 0, _randint(g, len(COUNTS) - 1, n) + 1)
    if factor in ("position", "size", "shape"):
        count = torch.zeros(n, dtype=torch.long)  # these labels are about a single object
    if factor == "count":
        count = labels.clone()
    single = count == 0
    # Single objects: centred (any size) or near an edge (tiny .. large).
    position = torch.where(torch.rand(n, generator=g) < 0.4, torch.full((n,), CENTER), _randint(g, 4, n))
    size = _randint(g, len(SIZES), n)
    if factor == "shape":
        # At 32 px a small square and a small circle differ by a few pixels: the shape task
        # shows large objects, the way a classification dataset frames its subject.
        size = 2 + _randint(g, len(SIZES) - 2, n)
    if factor == "position":
        size = 1 + _randint(g, len(SIZES) - 2, n)  # small or large: a tiny one drowns in the noise
    if factor == "position":
        position = labels.clone()
    if factor == "size":
        size = labels.clone()
        position = torch.where(size == 3, torch.full((n,), CENTER), position)
    size = torch.where((position != CENTER) & (size == 3), _randint(g, 3, n), size)
    position = torch.where(single, position, torch.full((n,), -1))
    size = torch.where(single, size, torch.full((n,), -1))
    if factor == "shape":
        shape = labels.clone()
    elif factor == "color":
        color = labels.clone()
    elif factor == "pattern":
        pattern = labels.clone()
    return Scenes(shape, color, pattern, count, size, position)


def _shape_mask(shape: int, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Inside-mask (float) of one shape at offsets normalised by the object's radius."""
    ax, ay = dx.abs(), dy.abs()
    if shape == 0:  # circle
        m = dx * dx + dy * dy <= 1.0
    elif shape == 1:  # square
        m = torch.maximum(ax, ay) <= 0.82
    elif shape == 2:  # upward triangle: apex at dy=-1, base at dy=0.85
        m = (dy >= -1.0) & (dy <= 0.85) & (ax <= (dy + 1.0) * 0.55)
    elif shape == 3:  # cross
        m = ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
    else:  # ring
        r2 = dx * dx + dy * dy
        m = (r2 <= 1.0) & (r2 >= 0.3)
    return m.float()


def _background(g: torch.Generator, pattern: torch.Tensor, size: int) -> torch.Tensor:
    """Pattern intensity in [-1, 1], [N, S, S], with random period / phase / orientation."""
    n = len(pattern)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    scale = size / 32.0
    period = (torch.rand(n, generator=g) * 4.0 + 5.0)[:, None, None] * scale
    phase_x = torch.rand(n, generator=g)[:, None, None] * period
    phase_y = torch.rand(n, generator=g)[:, None, None] * period
    u = (xs[None] + phase_x) / period
    v = (ys[None] + phase_y) / period
    vertical = (torch.rand(n, generator=g) < 0.5)[:, None, None]
    stripes = torch.where(vertical, torch.sin(2 * math.pi * u), torch.sin(2 * math.pi * v)).sign()
    checks = (torch.floor(u) + torch.floor(v)).remainder(2) * 2 - 1
    du, dv = u - torch.floor(u) - 0.5, v - torch.floor(v) - 0.5
    dots = ((du * du + dv * dv) <= 0.09).float() * 2 - 1
    plain = torch.zeros_like(stripes)
    all_p = torch.stack([plain, stripes, checks, dots], 1)  # [N, 4, S, S]
    return all_p.gather(1, pattern[:, None, None, None].expand(n, 1, size, size))[:, 0]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` intra-op threads for the duration (restored afterwards)."""
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def single_thread():
    """:func:`torch_threads` (1).

    Rendering is many small element-wise ops: with two threads on a busy 2-core machine
    (another trial training beside us) OpenMP's barriers make it ~40x slower, and one
    thread is as fast as two on an idle one.
    """
    return torch_threads(1)


def render(scenes: Scenes, domain: Domain, g: torch.Generator, image_size: int = 32, jitter_domain: bool = False) -> torch.Tensor:
    """Draw scenes in a domain; returns RGB in [0, 1], FloatTensor[N, 3, S, S].

    ``jitter_domain`` randomises background colour, noise and blur per image (used for
    pretraining so the model is not tied to one exact look, as web-scale data is not).
    """
    n = len(scenes)
    # Draw at twice the resolution and average down: anti-aliased edges.
    ss = 2
    big = image_size * ss
    px = image_size / 32.0  # pixel unit of the 32-pixel design
    ys, xs = torch.meshgrid(
        (torch.arange(big, dtype=torch.float32) + 0.5) / ss, (torch.arange(big, dtype=torch.float32) + 0.5) / ss, indexing="ij"
    )

    # Object centres and radii per slot (4 quadrant slots; a single object uses slot 0).
    radius = torch.where(scenes.size >= 0, torch.tensor(SIZE_RADII)[scenes.size.clamp(min=0)], torch.full((n,), MULTI_RADIUS))
    radius = radius * (1.0 + 0.12 * (torch.rand(n, generator=g) * 2 - 1)) * px
    quad = torch.tensor(QUADRANT_XY) * image_size  # [4, 2]
    jit = (torch.rand(n, 4, 2, generator=g) * 2 - 1) * 2.0 * px
    centres = quad[None].expand(n, 4, 2) + jit  # [N, 4, 2]
    # Slot occupancy: several objects take a random subset of quadrants.
    order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
    present = order < (scenes.count + 1)[:, None]
    single = scenes.count == 0
    pos = scenes.position.clamp(min=0)
    centre_single = torch.where(
        (scenes.position == CENTER)[:, None],
        torch.full((n, 2), image_size / 2.0) + (torch.rand(n, 2, generator=g) * 2 - 1) * 3.0 * px,
        torch.tensor(EDGE_XY)[pos.clamp(max=3)] * image_size + (torch.rand(n, 2, generator=g) * 2 - 1) * 1.5 * px,
    )
    # Keep a single object inside the frame.
    lo = radius[:, None] * 0.9
    centre_single = torch.minimum(torch.maximum(centre_single, lo), image_size - lo)
    centres[:, 0] = torch.where(single[:, None], centre_single, centres[:, 0])
    present[:, 1:] &= ~single[:, None]
    present[:, 0] |= single

    mask = torch.zeros(n, big, big)
    # Only the objects that exist, one shape at a time: drawing every shape for every slot
    # and selecting afterwards costs ~20x more (the benchmark must build in about a second).
    for k in range(4):
        for s in range(len(SHAPES)):
            idx = torch.nonzero(present[:, k] & (scenes.shape == s)).flatten()
            if len(idx) == 0:
                continue
            r = radius[idx, None, None]
            dx = (xs[None] - centres[idx, k, 0, None, None]) / r
            dy = (ys[None] - centres[idx, k, 1, None, None]) / r
            mask[idx] = torch.maximum(mask[idx], _shape_mask(s, dx, dy))
    mask = F.avg_pool2d(mask[:, None], ss)  # [N, 1, S, S]

    # Background: base colour with per-image brightness jitter and the pattern.
    bg = torch.tensor(domain.bg)[None, :, None, None].expand(n, 3, 1, 1).clone()
    amp, noise, blur = domain.pattern_amp, torch.full((n, 1, 1, 1), domain.noise), domain.blur
    if jitter_domain:
        bg = (torch.rand(n, 1, 1, 1, generator=g) * 0.6 + 0.2) + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.2
        noise = torch.rand(n, 1, 1, 1, generator=g) * 0.08
    bg = bg + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * domain.bg_jitter
    pat = _background(g, scenes.pattern, image_size)[:, None]
    # Pattern brightens on dark backgrounds and darkens on light ones, so it stays visible.
    sign = torch.where(bg.mean(1, keepdim=True) < 0.5, 1.0, -1.0)
    bgimg = bg + sign * amp * (pat + 1) / 2

    rgb = torch.tensor(COLOR_RGB)[scenes.color][:, :, None, None]
    rgb = rgb + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.1
    img = bgimg * (1 - mask) + rgb * mask

    # Domain look.
    if domain.invert:
        img = 1 - img
    saturation = torch.full((n, 1, 1, 1), domain.saturation)
    if jitter_domain:
        # Some washed-out pictures, as web data has: objects are not only told by colour.
        saturation = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.2, torch.rand(n, 1, 1, 1, generator=g), 1.0)
    if (saturation != 1.0).any():
        grey = (img * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
        img = grey + saturation * (img - grey)
    img = img * torch.tensor(domain.tint)[None, :, None, None]
    img = (img - 0.5) * domain.contrast + 0.5
    if jitter_domain:
        # Half of the pretraining images get a mild blur.
        soft = _gaussian_blur(img, 0.6)
        img = torch.where((torch.rand(n, 1, 1, 1, generator=g) < 0.3), soft, img)
    elif blur > 0:
        img = _gaussian_blur(img, blur * px)
    if domain.pixelate > 1:
        p = domain.pixelate
        img = F.interpolate(F.avg_pool2d(img, p), scale_factor=p, mode="nearest")
    img = img + noise * torch.randn(img.shape, generator=g)
    return img.clamp(0, 1)


def normalize(img: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> CLIP input (OPENAI mean / std), what open_clip's preprocess produces."""
    mean = torch.tensor(OPENAI_MEAN)[None, :, None, None]
    std = torch.tensor(OPENAI_STD)[None, :, None, None]
    return (img - mean) / std


# --------------------------------------------------------------------------- captions


# Columns of a caption's constraint row (see :class:`PretrainBatch`).
CONSTRAINT_COLUMNS = ("shape", "color", "pattern", "count", "size", "position", "multi")
FREE = -1

# Web captions phrase the same content many ways; the variety keeps the text tower from
# keying on one frame, so that the tasks' own templates (which it never saw verbatim)
# still work zero-shot.
_PREFIXES = ("", "a photo of ", "an image of ", "a picture of ", "a drawing of ", "a photo showing ")
_NOUNS = ("object", "shape", "thing")


@dataclass
class PretrainBatch:
    """Base-domain image-caption pairs.

    ``factors[i]`` are image i's true factor indices in :data:`CONSTRAINT_COLUMNS` order
    (size / position are -1 for multi-object scenes); ``constraints[j]`` is what caption j
    asserts (``FREE`` where it says nothing). Image i matches caption j when every asserted
    factor is true of i: short captions ("a red thing.") match many images, and the
    pretraining loss uses that instead of treating every other pair as a negative.
    """

    images: torch.Tensor  # [N, 3, S, S], normalised
    captions: list[str]
    factors: torch.Tensor  # LongTensor[N, 7]
    constraints: torch.Tensor  # LongTensor[N, 7]

    def matches(self) -> torch.Tensor:
        """BoolTensor[N images, N captions]: caption j is a true description of image i."""
        c = self.constraints[None, :, :]
        return ((c == FREE) | (c == self.factors[:, None, :])).all(-1)


def _scene_factors(scenes: Scenes) -> torch.Tensor:
    multi = (scenes.count > 0).long()
    return torch.stack(
        [scenes.shape, scenes.color, scenes.pattern, scenes.count, scenes.size, scenes.position, multi], 1
    )


# Order of the caption factors (the first six constraint columns).
CAPTION_FACTORS = ("shape", "color", "pattern", "count", "size", "position")
MentionProb = float | dict[str, float]


def _mention_probs(mention_prob: MentionProb) -> torch.Tensor:
    if isinstance(mention_prob, dict):
        return torch.tensor([float(mention_prob.get(f, 0.5)) for f in CAPTION_FACTORS])
    return torch.full((len(CAPTION_FACTORS),), float(mention_prob))


def caption(scenes: Scenes, i: int, g: torch.Generator, mention_prob: MentionProb = 0.5) -> tuple[str, list[int]]:
    """A caption naming a random non-empty subset of scene ``i``'s factors (each with
    probability ``mention_prob``, one number or one per factor), and its constraint row
    (what it asserts, ``FREE`` elsewhere).
    """
    cons = [FREE] * len(CONSTRAINT_COLUMNS)
    keep = torch.rand(6, generator=g) < _mention_probs(mention_prob)
    if not bool(keep.any()):
        keep[int(torch.randint(0, 6, (1,), generator=g))] = True
    k_shape, k_color, k_pattern, k_count, k_size, k_pos = (bool(x) for x in keep)
    count = int(scenes.count[i])
    size, pos = int(scenes.size[i]), int(scenes.position[i])
    multi = count > 0
    words: list[str] = []
    if k_count:
        words.append(COUNTS[count])
        cons[3] = count
    else:
        # "a" / "some" (and the plural noun) still say whether there is one object.
        words.append("some" if multi else "a")
    cons[6] = int(multi)
    if k_size and size >= 0:
        words.append(SIZES[size])
        cons[4] = size
    if k_color:
        words.append(COLORS[int(scenes.color[i])])
        cons[1] = int(scenes.color[i])
    shape = int(scenes.shape[i])
    if k_shape:
        words.append(SHAPE_PLURALS[shape] if multi else SHAPES[shape])
        cons[0] = shape
    else:
        noun = _NOUNS[int(torch.randint(0, len(_NOUNS), (1,), generator=g))]
        words.append(noun + "s" if multi else noun)
    if k_pos and pos >= 0:
        if pos == CENTER:
            words.append("in the center")
        else:
            words.append(f"{'on' if torch.rand(1, generator=g) < 0.5 else 'at'} the {POSITIONS[pos]}")
        cons[5] = pos
    if k_pattern:
        words.append(f"on a {PATTERNS[int(scenes.pattern[i])]} background")
        cons[2] = int(scenes.pattern[i])
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    prefix = _PREFIXES[int(torch.randint(0, len(_PREFIXES), (1,), generator=g))]
    return prefix + " ".join(words) + ".", cons


@dataclass
class PretrainPool:
    """Rendered base-domain scenes that pretraining batches are drawn from.

    Rendering is a quarter of a pretraining step's time on 2 cores; drawing batches from
    a pool rendered once (each image seen a few times, with a fresh caption each time)
    buys more optimisation steps in the same budget.
    """

    scenes: Scenes
    images: torch.Tensor  # [N, 3, S, S], normalised

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor, g: torch.Generator, mention_prob: MentionProb = 0.5) -> PretrainBatch:
        """The images at ``idx`` with newly drawn captions."""
        scenes = self.scenes.select(idx)
        caps, cons = zip(*(caption(scenes, i, g, mention_prob) for i in range(len(idx))))
        return PretrainBatch(self.images[idx], list(caps), _scene_factors(scenes), torch.tensor(cons, dtype=torch.long))


def pretraining_pool(g: torch.Generator, n: int, image_size: int = 32, p_single: float | None = 0.5) -> PretrainPool:
    """N base-domain images: every factor random, neutral domain with per-image jitter.

    ``p_single`` (share of one-object scenes) is above the uniform 1/4 because size and
    position only exist for single objects; otherwise they are rarely captioned.
    """
    with single_thread():
        scenes = sample_scenes(g, n, p_single=p_single)
        images = torch.empty(n, 3, image_size, image_size)
        # In chunks: the renderer's working tensors grow with N x (2 S)^2.
        for start in range(0, n, 1024):
            sl = slice(start, min(n, start + 1024))
            images[sl] = normalize(render(scenes.select(torch.arange(n)[sl]), BASE_DOMAIN, g, image_size, jitter_domain=True))
    return PretrainPool(scenes, images)


def pretraining_batch(
    g: torch.Generator, n: int, image_size: int = 32, mention_prob: MentionProb = 0.5, p_single: float | None = 0.5
) -> PretrainBatch:
    """N fresh base-domain image-caption pairs (a pool of N, captioned once)."""
    return pretraining_pool(g, n, image_size, p_single).batch(torch.arange(n), g, mention_prob)


# --------------------------------------------------------------------------- benchmark


def _split(tdef: TaskDef, n_per_class: int, g: torch.Generator, image_size: int, domain_mix: float = 0.0) -> TensorTaskDataset:
    n_classes = len(FACTOR_VALUES[tdef.factor])
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    scenes = sample_scenes(g, len(labels), tdef.factor, labels)
    if domain_mix == 0.0:
        # No draws from g: the default benchmark stays bit-identical to earlier versions.
        images = normalize(render(scenes, tdef.domain, g, image_size))
        return TensorTaskDataset(images.contiguous(), labels)
    own = TASK_NAMES.index(tdef.name)
    mixed = torch.rand(len(labels), generator=g) < domain_mix
    domain_of = torch.where(mixed, torch.randint(len(TASKS), (len(labels),), generator=g), own)
    images = torch.empty(len(labels), 3, image_size, image_size)
    for d in domain_of.unique().tolist():
        idx = (domain_of == d).nonzero().squeeze(1)
        images[idx] = normalize(render(scenes.select(idx), TASKS[d].domain, g, image_size))
    return TensorTaskDataset(images.contiguous(), labels)


def build_synthetic(options: dict, image_size: int, seed: int, **_disk: object) -> Benchmark:
    """Builder of the ``synthetic`` benchmark (see :class:`SyntheticOptions`).

    ``seed`` is the caller's data seed; ``options["data_seed"]`` is added to it, so the
    default (0) keeps the caller's choice.
    """
    opts = SyntheticOptions.model_validate(options)
    size = opts.image_size or image_size
    tasks = []
    for ti, tdef in enumerate(TASKS):
        # One stream per (task, split): changing one task's sizes never changes another's.
        g_train = torch.Generator().manual_seed(hash_seed(seed + opts.data_seed, ti, 0))
        g_test = torch.Generator().manual_seed(hash_seed(seed + opts.data_seed, ti, 1))
        with single_thread():
            train = _split(tdef, opts.n_train_per_class, g_train, size, opts.domain_mix)
            test = _split(tdef, opts.n_test_per_class, g_test, size, opts.domain_mix)
        tasks.append(
            Task(
                name=tdef.name,
                classnames=list(FACTOR_VALUES[tdef.factor]),
                templates=list(tdef.templates),
                train=train,
                test=test,
                info={
                    "factor": tdef.factor,
                    "domain": tdef.domain.description,
                    "domain_mix": opts.domain_mix,
                    "n_train": len(train),
                    "n_test": len(test),
                    "image_size": size,
                },
            )
        )
    return Benchmark("synthetic", tasks)


def hash_seed(*parts: int) -> int:
    """A stable seed from integers (Python's hash() is randomised per process)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & ((1 << 63) - 1)
