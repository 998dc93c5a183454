"""A procedurally generated visual world for the embedded nano model (numpy + Pillow only, no downloads).

Scenes are made of regions of textured *stuff* (sky, grass, water, brick, ...) laid out as a warped Voronoi partition,
with shaped, coloured *things* (ball, star, heart, ...) drawn on top; then a global lighting change (brightness,
colour cast, gradient) and sensor noise. Every category is recognisable from local appearance (colour + texture
statistics of a 16x16 patch), which is what per-cell recognition needs.

Each :class:`Scene` carries the exact per-pixel label map (used **only for evaluation**) and per-category box
annotations (area + bounding box, the image- and box-level facts the pretraining texts are built from). Everything is
deterministic given the seed::

    from ifseg_rt.world import render_scene, CATEGORY_NAMES
    scene = render_scene(seed=7, size=128)                        # all 24 categories allowed
    scene = render_scene(seed=7, size=(96, 160), categories=["sky", "grass", "ball"])
    scene.image      # HxWx3 uint8
    scene.labels     # HxW int64, index into CATEGORY_NAMES
    scene.objects    # [SceneObject(category, name, box=(x0, y0, x1, y1), area), ...] by decreasing area
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

STUFF = "stuff"
THING = "thing"
MIN_SIZE = 16  # px; smallest scene side (one 16x16 cell)


@dataclass(frozen=True)
class Category:
    name: str  # one lower-case word (one BPE piece in the nano vocabulary)
    kind: str  # "stuff" (textured region) or "thing" (shaped object drawn on top)
    colour: Tuple[float, float, float]  # base RGB in [0, 1]
    colour_word: str  # for captions ("a red ball")


# Base colours and textures were chosen so that no two categories share both colour and texture statistics.
CATEGORIES: Tuple[Category, ...] = (
    Category("sky", STUFF, (0.45, 0.70, 0.95), "blue"),
    Category("grass", STUFF, (0.22, 0.62, 0.16), "green"),
    Category("water", STUFF, (0.08, 0.28, 0.58), "blue"),
    Category("sand", STUFF, (0.87, 0.77, 0.52), "yellow"),
    Category("brick", STUFF, (0.66, 0.24, 0.16), "red"),
    Category("wood", STUFF, (0.56, 0.36, 0.18), "brown"),
    Category("snow", STUFF, (0.95, 0.96, 0.98), "white"),
    Category("rock", STUFF, (0.50, 0.49, 0.47), "grey"),
    Category("road", STUFF, (0.22, 0.22, 0.24), "black"),
    Category("leaves", STUFF, (0.10, 0.34, 0.10), "green"),
    Category("lava", STUFF, (0.92, 0.36, 0.05), "orange"),
    Category("tile", STUFF, (0.85, 0.85, 0.85), "white"),
    Category("carpet", STUFF, (0.46, 0.20, 0.56), "purple"),
    Category("mud", STUFF, (0.33, 0.24, 0.14), "brown"),
    Category("ice", STUFF, (0.74, 0.90, 0.96), "blue"),
    Category("metal", STUFF, (0.68, 0.70, 0.74), "grey"),
    Category("gravel", STUFF, (0.58, 0.52, 0.44), "grey"),
    Category("ball", THING, (0.90, 0.08, 0.08), "red"),
    Category("star", THING, (1.00, 0.85, 0.08), "yellow"),
    Category("heart", THING, (1.00, 0.45, 0.75), "pink"),
    Category("diamond", THING, (0.08, 0.88, 0.88), "cyan"),
    Category("cone", THING, (0.98, 0.55, 0.00), "orange"),
    Category("ring", THING, (0.15, 0.20, 0.95), "blue"),
    Category("cross", THING, (0.85, 0.10, 0.85), "magenta"),
)
CATEGORY_NAMES: Tuple[str, ...] = tuple(c.name for c in CATEGORIES)
STUFF_NAMES: Tuple[str, ...] = tuple(c.name for c in CATEGORIES if c.kind == STUFF)
THING_NAMES: Tuple[str, ...] = tuple(c.name for c in CATEGORIES if c.kind == THING)
_INDEX: Dict[str, int] = {n: i for i, n in enumerate(CATEGORY_NAMES)}

# the demo's default category set: 10 stuff + 4 things (>= 8, the requirement)
DEFAULT_DEMO_CATEGORIES: Tuple[str, ...] = ("sky", "grass", "water", "sand", "brick", "wood", "snow", "rock", "road",
                                            "lava", "ball", "star", "heart", "ring")


@dataclass
class SceneObject:
    """Box-level annotation of one category present in a scene (what pretraining texts may use)."""

    category: int  # index into CATEGORY_NAMES
    name: str
    box: Tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end-exclusive (bounding box of its visible pixels)
    area: int  # visible pixels


@dataclass
class Scene:
    image: np.ndarray  # HxWx3 uint8
    labels: np.ndarray  # HxW int64 index into CATEGORY_NAMES (exact, evaluation only)
    objects: List[SceneObject]  # one per present category, by decreasing area
    seed: int

    @property
    def names(self) -> List[str]:
        return [o.name for o in self.objects]


def category_index(name: str) -> int:
    """Index of a world category; ``ValueError`` naming the known categories otherwise."""
    try:
        return _INDEX[name]
    except KeyError:
        raise ValueError(f"unknown category {name!r}; the synthetic world has {len(CATEGORY_NAMES)} categories: "
                         f"{', '.join(CATEGORY_NAMES)}") from None


def check_categories(names: Sequence[str]) -> List[str]:
    """Validate a category subset: non-empty, known, no repeats. Returns the names as a list."""
    names = [str(n).strip() for n in names]
    if not names or not all(names):
        raise ValueError("the category list is empty (or holds an empty name); choose from: "
                         + ", ".join(CATEGORY_NAMES))
    unknown = [n for n in names if n not in _INDEX]
    if unknown:
        raise ValueError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}; "
                         f"the synthetic world knows: {', '.join(CATEGORY_NAMES)}")
    seen = set()
    for n in names:
        if n in seen:
            raise ValueError(f"category {n!r} is listed twice")
        seen.add(n)
    return names


# --- noise and textures ------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: Optional[float] = None
                  ) -> np.ndarray:
    """Value noise in [0, 1]: a random lattice every ``cell`` pixels, bilinearly interpolated (HxW float32)."""
    from PIL import Image

    cell_x = cell_y if cell_x is None else cell_x
    gh, gw = int(np.ceil(h / cell_y)) + 2, int(np.ceil(w / cell_x)) + 2
    lattice = rng.random((gh, gw), dtype=np.float32)
    big = np.asarray(Image.fromarray(lattice, mode="F").resize((int(gw * cell_x), int(gh * cell_y)),
                                                               Image.BILINEAR))
    oy, ox = rng.integers(0, max(int(cell_y), 1)), rng.integers(0, max(int(cell_x), 1))
    return big[oy:oy + h, ox:ox + w]


def _coords(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w].astype(np.float32)


def _tex_sky(rng, h, w, base):
    y, _ = _coords(h, w)
    t = base + (y / max(h, 1))[..., None] * np.float32(0.12) * np.array([1, 0.6, 0.1], np.float32)
    return t + 0.025 * (_smooth_noise(rng, h, w, 24)[..., None] - 0.5)


def _tex_grass(rng, h, w, base):
    blades = _smooth_noise(rng, h, w, 7, 1.5)
    return base * (0.7 + 0.6 * blades[..., None])


def _tex_water(rng, h, w, base):
    y, x = _coords(h, w)
    ph = rng.random() * 6.28
    waves = np.sin(2 * np.pi * y / 6.0 + 1.2 * np.sin(x / 9.0 + ph) + ph)
    return base + (0.09 * waves)[..., None] + 0.03 * (_smooth_noise(rng, h, w, 12)[..., None] - 0.5)


def _tex_sand(rng, h, w, base):
    return base + 0.07 * (rng.random((h, w, 1), dtype=np.float32) - 0.5) \
        + 0.05 * (_smooth_noise(rng, h, w, 16)[..., None] - 0.5)


def _tex_brick(rng, h, w, base):
    y, x = _coords(h, w)
    oy, ox = rng.integers(0, 8), rng.integers(0, 16)
    row = np.floor((y + oy) / 8.0)
    xs = x + ox + 8.0 * (row % 2)
    mortar = (((y + oy) % 8) < 1.5) | ((xs % 16) < 1.5)
    t = base * (0.85 + 0.3 * _smooth_noise(rng, h, w, 5)[..., None])
    return np.where(mortar[..., None], np.float32([0.78, 0.76, 0.70]), t)


def _tex_wood(rng, h, w, base):
    y, _ = _coords(h, w)
    warp = 4.0 * _smooth_noise(rng, h, w, 20, 40)
    grain = np.sin(2 * np.pi * (y + warp) / 5.0)
    return base * (1.0 + 0.18 * grain[..., None])


def _tex_snow(rng, h, w, base):
    t = base - 0.05 * _smooth_noise(rng, h, w, 18)[..., None]
    sparkle = rng.random((h, w)) > 0.985
    return np.where(sparkle[..., None], np.float32(1.0), t)


def _tex_rock(rng, h, w, base):
    return base * (0.7 + 0.6 * _smooth_noise(rng, h, w, 7)[..., None]) \
        + 0.05 * (rng.random((h, w, 1), dtype=np.float32) - 0.5)


def _tex_road(rng, h, w, base):
    return base + 0.08 * (rng.random((h, w, 1), dtype=np.float32) - 0.5)


def _tex_leaves(rng, h, w, base):
    n = _smooth_noise(rng, h, w, 3)
    return base * (0.5 + 1.1 * n[..., None])


def _tex_lava(rng, h, w, base):
    n = _smooth_noise(rng, h, w, 10)
    crack = np.abs(n - 0.5) < 0.05
    t = base * (0.85 + 0.3 * _smooth_noise(rng, h, w, 4)[..., None])
    return np.where(crack[..., None], np.float32([0.25, 0.05, 0.02]), t)


def _tex_tile(rng, h, w, base):
    y, x = _coords(h, w)
    oy, ox = rng.integers(0, 16, size=2)
    checker = ((np.floor((y + oy) / 8) + np.floor((x + ox) / 8)) % 2)[..., None]
    return np.where(checker > 0, base, np.float32([0.45, 0.48, 0.60]))


def _tex_carpet(rng, h, w, base):
    y, x = _coords(h, w)
    dots = ((y % 4) < 1) & ((x % 4) < 1)
    t = base + 0.1 * (rng.random((h, w, 1), dtype=np.float32) - 0.5)
    return np.where(dots[..., None], base * 1.4, t)


def _tex_mud(rng, h, w, base):
    return base * (0.8 + 0.4 * _smooth_noise(rng, h, w, 10)[..., None]) \
        + 0.03 * (rng.random((h, w, 1), dtype=np.float32) - 0.5)


def _tex_ice(rng, h, w, base):
    y, x = _coords(h, w)
    streak = np.sin(2 * np.pi * (x + y) / 11.0 + 2.0 * _smooth_noise(rng, h, w, 16))
    return base + (0.05 * streak)[..., None]


def _tex_metal(rng, h, w, base):
    brushed = _smooth_noise(rng, h, w, 1.0, 24)
    return base * (0.9 + 0.2 * brushed[..., None])


def _tex_gravel(rng, h, w, base):
    stones = _smooth_noise(rng, h, w, 2.5)
    hue = _smooth_noise(rng, h, w, 2.5)[..., None]
    return base * (0.6 + 0.8 * stones[..., None]) + 0.08 * (hue - 0.5) * np.float32([1.0, 0.5, -0.5])


_TEXTURES: Dict[str, Callable] = {
    "sky": _tex_sky, "grass": _tex_grass, "water": _tex_water, "sand": _tex_sand, "brick": _tex_brick,
    "wood": _tex_wood, "snow": _tex_snow, "rock": _tex_rock, "road": _tex_road, "leaves": _tex_leaves,
    "lava": _tex_lava, "tile": _tex_tile, "carpet": _tex_carpet, "mud": _tex_mud, "ice": _tex_ice,
    "metal": _tex_metal, "gravel": _tex_gravel,
}


# --- thing shapes ------------------------------------------------------------------------------------------------
def _polygon_mask(h: int, w: int, points) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("L", (w, h), 0)
    ImageDraw.Draw(im).polygon([(float(x), float(y)) for x, y in points], fill=1)
    return np.asarray(im, dtype=bool)


def _shape_mask(name: str, h: int, w: int, cy: float, cx: float, r: float, rng) -> np.ndarray:
    y, x = _coords(h, w)
    dy, dx = (y + 0.5 - cy) / r, (x + 0.5 - cx) / r
    if name == "ball":
        return dx * dx + dy * dy <= 1.0
    if name == "ring":
        d = dx * dx + dy * dy
        return (d <= 1.0) & (d >= 0.36)
    if name == "diamond":
        return np.abs(dx) * 1.25 + np.abs(dy) <= 1.0
    if name == "cone":
        return (dy >= -1.0) & (dy <= 1.0) & (np.abs(dx) <= (dy + 1.0) * 0.5)
    if name == "cross":
        return ((np.abs(dx) <= 0.35) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= 0.35) & (np.abs(dx) <= 1.0))
    if name == "heart":
        hx, hy = dx * 1.15, -dy * 1.15 + 0.15
        return (hx * hx + hy * hy - 1.0) ** 3 - hx * hx * hy ** 3 <= 0.0
    if name == "star":
        rot = rng.random() * 2 * np.pi / 5
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = rot - np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return _polygon_mask(h, w, pts)
    raise ValueError(f"no shape for {name!r}")


# --- scenes ------------------------------------------------------------------------------------------------------
def _size(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"scene size {h}x{w} is too small; each side must be >= {MIN_SIZE} px")
    return int(h), int(w)


def _stuff_layout(rng, h: int, w: int, k: int) -> np.ndarray:
    """HxW region index in 0..k-1: a warped, anisotropic Voronoi partition (regions of a few 16-px cells or more)."""
    if k == 1:
        return np.zeros((h, w), dtype=np.int64)
    y, x = _coords(h, w)
    y, x = y / max(h, w), x / max(h, w)
    seeds = rng.random((k, 2)) * np.array([h, w]) / max(h, w)
    d = np.empty((k, h, w), dtype=np.float32)
    for i in range(k):
        sy, sx = rng.uniform(0.5, 2.0, size=2)
        d[i] = sy * (y - seeds[i, 0]) ** 2 + sx * (x - seeds[i, 1]) ** 2
        d[i] += 0.04 * (_smooth_noise(rng, h, w, max(h, w) / 4) - 0.5)
    return np.argmin(d, axis=0).astype(np.int64)


def render_scene(seed: int, size: Union[int, Tuple[int, int]] = 128,
                 categories: Optional[Sequence[str]] = None, *, max_stuff: int = 4, max_things: int = 3) -> Scene:
    """Render one scene, deterministically from ``seed``.

    Parameters
    ----------
    seed : every random choice (layout, categories, textures, lighting, noise) derives from it
    size : H = W, or (H, W) in pixels; textures keep their pixel scale, layouts scale with the image
    categories : the categories the scene may contain (default: all). Stuff regions use its stuff categories; when it
        has none, the background takes stuff from the whole world (those pixels belong to categories outside the
        set and an evaluation ignores them).
    max_stuff, max_things : at most this many distinct stuff regions / things per scene

    Returns
    -------
    Scene with an HxWx3 uint8 image, the exact HxW label map and one box annotation per present category
    """
    h, w = _size(size)
    names = list(CATEGORY_NAMES) if categories is None else check_categories(categories)
    stuff = [n for n in names if n in STUFF_NAMES] or list(STUFF_NAMES)
    things = [n for n in names if n in THING_NAMES]
    rng = np.random.default_rng(seed)

    k = int(rng.integers(1, min(max_stuff, len(stuff)) + 1))
    chosen = [stuff[i] for i in rng.choice(len(stuff), size=k, replace=False)]
    region = _stuff_layout(rng, h, w, k)
    image = np.zeros((h, w, 3), dtype=np.float32)
    labels = np.zeros((h, w), dtype=np.int64)
    for i, name in enumerate(chosen):
        cat = CATEGORIES[_INDEX[name]]
        base = np.float32(cat.colour) + rng.uniform(-0.03, 0.03, size=3).astype(np.float32)
        tex = _TEXTURES[name](rng, h, w, base).astype(np.float32)
        m = region == i
        np.copyto(image, tex, where=m[..., None])
        labels[m] = _INDEX[name]

    n_things = int(rng.integers(0, min(max_things, len(things)) + 1)) if things else 0
    side = min(h, w)
    for j in rng.choice(len(things), size=n_things, replace=False) if n_things else []:
        name = things[j]
        cat = CATEGORIES[_INDEX[name]]
        r = side * rng.uniform(0.12, 0.24)
        cy, cx = rng.uniform(r * 0.8, h - r * 0.8), rng.uniform(r * 0.8, w - r * 0.8)
        m = _shape_mask(name, h, w, cy, cx, r, rng)
        if not m.any():
            continue
        y, x = _coords(h, w)
        shade = 1.0 + 0.25 * (((cy - y) + (cx - x)) / (2 * r)).clip(-1, 1)  # light from the top left
        base = np.float32(cat.colour) + rng.uniform(-0.03, 0.03, size=3).astype(np.float32)
        tex = base * shade[..., None] + 0.03 * (_smooth_noise(rng, h, w, 6)[..., None] - 0.5)
        np.copyto(image, tex, where=m[..., None])
        labels[m] = _INDEX[name]

    # lighting: brightness, colour cast, a linear gradient; then sensor noise
    yy, xx = _coords(h, w)
    gy, gx = rng.uniform(-0.08, 0.08, size=2)
    light = rng.uniform(0.88, 1.12) * (1.0 + gy * (yy / h - 0.5) * 2 + gx * (xx / w - 0.5) * 2)
    image = image * light[..., None] + rng.uniform(-0.03, 0.03, size=3).astype(np.float32)
    image += np.float32(0.02) * rng.standard_normal(image.shape, dtype=np.float32)
    image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Scene(image=image, labels=labels, objects=scene_objects(labels), seed=int(seed))


def scene_objects(labels: np.ndarray) -> List[SceneObject]:
    """Box annotations (bounding box and area of every present category) of a label map, by decreasing area."""
    out = []
    counts = np.bincount(labels.ravel(), minlength=len(CATEGORY_NAMES))
    for c in np.flatnonzero(counts):
        ys, xs = np.nonzero(np.any(labels == c, axis=1))[0], np.nonzero(np.any(labels == c, axis=0))[0]
        out.append(SceneObject(category=int(c), name=CATEGORY_NAMES[c],
                               box=(int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1), area=int(counts[c])))
    out.sort(key=lambda o: (-o.area, o.category))
    return out


def write_dataset(out_dir: Union[str, Path], seeds: Sequence[int], categories: Sequence[str], *,
                  size: Union[int, Tuple[int, int]] = 128) -> List[Tuple[Path, Path]]:
    """Render scenes for an evaluation set: ``out_dir/images/NNNN.png`` and ``out_dir/labels/NNNN.png``.

    Labels use the evaluation encoding (ifseg.md §13): 0 = ignore (a category outside ``categories``), v = index
    into ``categories`` + 1. Returns the (image, label) pairs.
    """
    from PIL import Image

    names = check_categories(categories)
    lut = np.zeros(len(CATEGORY_NAMES), dtype=np.uint8)
    for k, n in enumerate(names):
        lut[_INDEX[n]] = k + 1
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, seed in enumerate(seeds):
        scene = render_scene(int(seed), size, names)
        img, lab = out_dir / "images" / f"{i:04d}.png", out_dir / "labels" / f"{i:04d}.png"
        Image.fromarray(scene.image).save(img)
        Image.fromarray(lut[scene.labels]).save(lab)
        pairs.append((img, lab))
    return pairs
