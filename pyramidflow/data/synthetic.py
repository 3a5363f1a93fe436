"""A synthetic anomaly-detection data set in the MVTec AD layout, deterministic by seed.

Real data sets cannot be downloaded here, so tests and ``pyramidflow demo`` use this generator. Every
object category is *registered* (the object sits at the same place in every image) with modest
normal variation: sub-pixel jitter, small brightness, tint and illumination changes, per-thread
intensity changes and sensor noise. Test images carry one defect each, of five kinds, with the exact
pixel mask of the pixels it changed:

- ``scratch``: a thin smooth curve (a quadratic Bezier), lighter on metal, darker on fabric;
- ``crack``: a jagged, branching dark line (a random walk with side branches);
- ``spot``: an irregular round spot, darker or lighter, strongest at its centre;
- ``stain``: a larger irregular blob tinted with a colour (rust, oil or ink), texture still visible;
- ``missing``: a piece of the object removed, showing what lies behind it (background, bare board,
  the fabric's backing).

Categories: ``fabric`` (a texture: a woven mesh with a fibre grain, shown at a random phase in
every image as real textures are, and symmetric under flips and 90-degree rotations so the texture
augmentation keeps it in distribution), ``nut`` (a hexagonal nut
centred on a dark background) and ``pcb`` (a circuit board with a chip, pads and traces). A whole set at
256 px takes a few seconds.

Example:
    >>> import tempfile
    >>> root = generate(tempfile.mkdtemp(), size=64, categories=("nut",), num_train=2, num_test=1)
    >>> sorted(p.name for p in (root / "nut" / "test").iterdir())
    ['crack', 'good', 'missing', 'scratch', 'spot', 'stain']
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .._utils import atomic_write

__all__ = ["TEXTURES", "OBJECTS", "CATEGORIES", "DEFECT_TYPES", "generate", "is_texture"]

TEXTURES = ("fabric",)
OBJECTS = ("nut", "pcb")
CATEGORIES = TEXTURES + OBJECTS
DEFECT_TYPES = ("scratch", "crack", "spot", "stain", "missing")

_NOISE_STD = 0.012
_MIN_DEFECT_FRACTION = 0.004  # of the image area; smaller draws are redrawn


def _internal_assert(cond: bool, what: str) -> None:
    # Same message as pyramidflow.engine.errors._internal_assert, without importing the engine.
    if not cond:
        raise RuntimeError(f"{what}: this is a bug in pyramidflow, please report it.")


def is_texture(category: str) -> bool:
    """Whether a synthetic category is a texture (augmented with flips and rotations in training)."""
    return category in TEXTURES


# ----------------------------------------------------------------------------------------------------
# Normal images. Each renderer returns (clean image (S, S, 3) in [0, 1], what lies behind the object
# (S, S, 3), region where defects may be placed (S, S) bool).


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates relative to the image centre: x of shape (1, S), y of shape (S, 1)."""
    c = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    return c[None, :], c[:, None]


def _symmetric_grain(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Smooth random field with unit std, symmetric under flips and 90-degree rotations."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    field = field + field[::-1] + field[:, ::-1] + field[::-1, ::-1]
    field = field + field.T
    return (field - field.mean()) / (field.std() + 1e-12)


class _Fabric:
    """A woven mesh: vertical and horizontal threads with a fixed fibre grain."""

    colour = np.array([0.62, 0.50, 0.36])
    backing = np.array([0.12, 0.10, 0.09])

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.size = size
        self.period = size / 16.0
        self.grain = 0.05 * _symmetric_grain(rng, size, sigma=max(0.7, size / 256.0))

    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Like a real texture (and unlike the objects), the weave is not registered: each image shows
        # it at a random phase, so a per-pixel template of raw images cannot describe it.
        x, y = _coords(self.size)
        p = self.period
        x = x + rng.uniform(0.0, 2.0 * p)
        y = y + rng.uniform(0.0, 2.0 * p)
        grain = np.roll(self.grain, tuple(rng.integers(0, self.size, 2)), axis=(0, 1))
        count = int(self.size // p) + 3
        column = np.clip(np.floor(x / p + 0.5).astype(int) + count // 2, 0, count - 1)
        row = np.clip(np.floor(y / p + 0.5).astype(int) + count // 2, 0, count - 1)
        warp = 1.0 + rng.uniform(-0.04, 0.04, count)[column]  # per-thread intensity
        weft = 1.0 + rng.uniform(-0.04, 0.04, count)[row]
        vertical = np.cos(np.pi * x / p) ** 2 * warp
        horizontal = np.cos(np.pi * y / p) ** 2 * weft
        height = 0.5 * (vertical + horizontal) + 0.25 * vertical * horizontal
        shade = (0.6 + 0.4 * height) * (1.0 + grain)
        image = shade[..., None] * self.colour
        behind = np.broadcast_to(self.backing, image.shape).copy()
        return image, behind, np.ones((self.size, self.size), dtype=bool)


class _Nut:
    """A hexagonal nut with a round hole and a chamfer ring, lit from the upper left."""

    colour = np.array([0.80, 0.77, 0.70])
    background = np.array([0.16, 0.17, 0.19])

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.size = size
        x, y = _coords(size)
        r = np.hypot(x, y)
        # Fixed machining marks: faint concentric rings with a random phase.
        self.rings = 0.025 * np.sin(2 * np.pi * r / max(3.0, size / 64.0) + rng.uniform(0, 2 * np.pi))

    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.size
        x, y = _coords(s)
        x = x - rng.uniform(-0.3, 0.3)
        y = y - rng.uniform(-0.3, 0.3)
        angle = np.deg2rad(rng.uniform(-0.5, 0.5))
        r = np.hypot(x, y)
        apothem = 0.36 * s * np.cos(np.pi / 6)
        hexagon = np.max(
            [np.abs(x * np.cos(angle + k * np.pi / 3) + y * np.sin(angle + k * np.pi / 3)) for k in range(3)],
            axis=0,
        )
        cover = np.clip(0.5 - (hexagon - apothem), 0, 1) * np.clip(0.5 + (r - 0.14 * s), 0, 1)
        light = 0.62 - 0.14 * (x + y) / (0.5 * s) + 0.12 * np.exp(-(((r - 0.22 * s) / (0.018 * s)) ** 2))
        metal = (light + self.rings)[..., None] * self.colour
        behind = np.broadcast_to(self.background, metal.shape) * (1.0 - 0.15 * (r / s))[..., None]
        image = cover[..., None] * metal + (1 - cover[..., None]) * behind
        return image, behind.copy(), cover > 0.5


def _subpixel_shift(image: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """Shift an (S, S, C) image by less than a pixel with linear interpolation (edges repeated)."""
    for axis, d in ((0, dy), (1, dx)):
        step = 1 if d > 0 else -1
        neighbour = np.roll(image, step, axis=axis)
        edge = [slice(None)] * image.ndim
        edge[axis] = 0 if step > 0 else -1
        neighbour[tuple(edge)] = image[tuple(edge)]
        image = (1.0 - abs(d)) * image + abs(d) * neighbour
    return image


class _Pcb:
    """A green board with a chip, pins, pads, traces and silkscreen marks at fixed places."""

    # Label ids of the layout and their colours.
    _COLOURS = np.array(
        [
            [0.10, 0.10, 0.10],  # 0 outside the board
            [0.12, 0.40, 0.20],  # 1 substrate
            [0.30, 0.56, 0.28],  # 2 trace under solder mask
            [0.84, 0.70, 0.36],  # 3 pad
            [0.09, 0.09, 0.10],  # 4 chip body
            [0.72, 0.72, 0.74],  # 5 pin
            [0.90, 0.90, 0.86],  # 6 silkscreen
        ]
    )

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        s = self.size = size
        u = lambda v: max(1, int(round(v * s)))  # noqa: E731  (fraction of the size -> pixels)
        lab = np.zeros((s, s), dtype=np.int64)
        lab[u(0.06) : s - u(0.06), u(0.06) : s - u(0.06)] = 1
        c0, c1, r0, r1 = s // 2 - u(0.15), s // 2 + u(0.15), s // 2 - u(0.11), s // 2 + u(0.11)
        width = max(2, u(0.012))
        pads = []
        for k in range(5):
            pin_y = r0 + (k + 1) * (r1 - r0) // 6
            for side, pin_x in ((-1, c0), (1, c1)):
                pad_x = pin_x + side * int(rng.uniform(0.12, 0.25) * s)
                pad_y = int(np.clip(pin_y + rng.uniform(-0.2, 0.2) * s, u(0.12), s - u(0.12)))
                xa, xb = sorted((pin_x, pad_x))
                lab[pin_y - width // 2 : pin_y + (width + 1) // 2, xa:xb] = 2
                ya, yb = sorted((pin_y, pad_y))
                lab[ya:yb, pad_x - width // 2 : pad_x + (width + 1) // 2] = 2
                pads.append((pad_y, pad_x))
                lab[pin_y - width : pin_y + width, pin_x - u(0.03) : pin_x + u(0.03)] = 5
        half = max(2, u(0.022))
        for pad_y, pad_x in pads:
            lab[pad_y - half : pad_y + half, pad_x - half : pad_x + half] = 3
        lab[r0:r1, c0:c1] = 4
        # Silkscreen: outlines of a few component footprints.
        for _ in range(3):
            y0, x0 = int(rng.uniform(0.1, 0.8) * s), int(rng.uniform(0.1, 0.8) * s)
            h, w = u(rng.uniform(0.05, 0.09)), u(rng.uniform(0.08, 0.12))
            box = np.zeros_like(lab, dtype=bool)
            box[y0 : y0 + h, x0 : x0 + w] = True
            box &= ~ndimage.binary_erosion(box, iterations=max(1, u(0.006)))
            lab[box & (lab == 1)] = 6
        self.labels = lab
        self.image = self._COLOURS[lab]
        behind = self._COLOURS[np.where(lab == 0, 0, 1)]
        self.behind = behind
        self.region = ndimage.binary_erosion(lab > 0, iterations=u(0.02))

    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = _subpixel_shift(self.image, rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3))
        return image, self.behind.copy(), self.region


_RENDERERS: dict[str, Callable[[np.random.Generator, int], object]] = {
    "fabric": _Fabric,
    "nut": _Nut,
    "pcb": _Pcb,
}


# ----------------------------------------------------------------------------------------------------
# Defect shapes: each returns a float map in [0, 1], positive exactly on the defect's pixels.


def _pick_point(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    candidates = np.flatnonzero(region)
    index = candidates[rng.integers(candidates.size)]
    return np.array(divmod(int(index), region.shape[1]), dtype=np.float64)  # (row, col)


def _stroke(points: np.ndarray, size: int, width: float) -> np.ndarray:
    """Pixels within width/2 of a polyline given by dense (row, col) points; 1 on the axis, >= 0.4 at the rim."""
    axis = np.zeros((size, size), dtype=bool)
    rows, cols = np.rint(points).astype(int).T
    inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    axis[rows[inside], cols[inside]] = True
    if not axis.any():
        return np.zeros((size, size))
    distance = ndimage.distance_transform_edt(~axis)
    half = width / 2.0
    return np.where(distance <= half, 1.0 - 0.6 * distance / max(half, 1e-6), 0.0)


def _scratch(rng: np.random.Generator, size: int, region: np.ndarray) -> np.ndarray:
    middle = _pick_point(rng, region)
    length = rng.uniform(0.35, 0.55) * size
    direction = rng.uniform(0, 2 * np.pi)
    start = middle - 0.5 * length * np.array([np.sin(direction), np.cos(direction)])
    end = middle + 0.5 * length * np.array([np.sin(direction), np.cos(direction)])
    bend = (start + end) / 2 + rng.uniform(-0.25, 0.25) * length * np.array([np.cos(direction), -np.sin(direction)])
    t = np.linspace(0, 1, int(4 * length) + 2)[:, None]
    points = (1 - t) ** 2 * start + 2 * t * (1 - t) * bend + t**2 * end
    return _stroke(points, size, max(2.0, rng.uniform(4.0, 6.0) * size / 256))


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, length: float, step: float) -> np.ndarray:
    steps = max(2, int(length / step))
    headings = heading + np.cumsum(rng.uniform(-0.6, 0.6, steps))
    moves = step * np.stack([np.sin(headings), np.cos(headings)], axis=1)
    corners = np.vstack([start, start + np.cumsum(moves, axis=0)])
    t = np.linspace(0, 1, 8, endpoint=False)[:, None, None]
    dense = corners[:-1][None] * (1 - t) + corners[1:][None] * t
    return np.vstack([dense.transpose(1, 0, 2).reshape(-1, 2), corners[-1:]])


def _crack(rng: np.random.Generator, size: int, region: np.ndarray) -> np.ndarray:
    step = max(2.0, 0.02 * size)
    heading = rng.uniform(0, 2 * np.pi)
    main = _walk(rng, _pick_point(rng, region), heading, rng.uniform(0.3, 0.45) * size, step)
    paths = [main]
    for _ in range(rng.integers(1, 3)):
        fork = main[rng.integers(len(main) // 4, 3 * len(main) // 4)]
        side = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)
        paths.append(_walk(rng, fork, side, rng.uniform(0.1, 0.2) * size, step))
    return _stroke(np.vstack(paths), size, max(2.0, rng.uniform(3.0, 4.5) * size / 256))


def _blob(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """An irregular round blob: 1 at the centre falling to about 0.4 at its rim, 0 outside."""
    x, y = _coords(size)
    dy = y + (size - 1) / 2.0 - centre[0]
    dx = x + (size - 1) / 2.0 - centre[1]
    theta = np.arctan2(dy, dx)
    wobble = 1.0 + sum(
        rng.uniform(0.04, 0.12) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    relative = np.hypot(dx, dy) / (radius * wobble)
    return np.where(relative <= 1.0, 1.0 - 0.6 * relative, 0.0)


def _spot(rng: np.random.Generator, size: int, region: np.ndarray) -> np.ndarray:
    return _blob(rng, size, _pick_point(rng, region), rng.uniform(0.05, 0.075) * size)


def _stain(rng: np.random.Generator, size: int, region: np.ndarray) -> np.ndarray:
    return _blob(rng, size, _pick_point(rng, region), rng.uniform(0.08, 0.12) * size)


def _missing(rng: np.random.Generator, size: int, region: np.ndarray) -> np.ndarray:
    # Objects lose a piece at their rim (where the region meets its outside); textures get a hole.
    rim = region & ~ndimage.binary_erosion(region, iterations=max(1, size // 64))
    rim &= ndimage.binary_erosion(np.ones_like(region), iterations=max(1, size // 16))
    centre = _pick_point(rng, rim if rim.any() else region)
    return _blob(rng, size, centre, rng.uniform(0.08, 0.11) * size)


_SHAPES = {"scratch": _scratch, "crack": _crack, "spot": _spot, "stain": _stain, "missing": _missing}
_TINTS = np.array([[1.0, 0.55, 0.25], [0.35, 0.30, 0.25], [0.40, 0.50, 0.95]])  # rust, oil, ink


def _apply_defect(
    rng: np.random.Generator, category: str, kind: str, image: np.ndarray, behind: np.ndarray, region: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a defect of ``kind`` onto ``image``; return (defective image, mask of the changed pixels)."""
    size = image.shape[0]
    if kind == "missing":
        # Only pixels that differ from what lies behind can go missing (e.g. a pad, not the bare board).
        region = region & (np.abs(image - behind).max(axis=2) > 0.05)
    placement = region if category in TEXTURES else ndimage.binary_erosion(region, iterations=max(1, size // 32))
    if not placement.any():
        placement = region
    _internal_assert(bool(region.any()), f"synthetic {category}: empty defect region")
    strength = np.zeros((size, size))
    for _ in range(20):  # redraw defects that mostly fall outside the object; keep the largest
        candidate = np.where(region, _SHAPES[kind](rng, size, placement), 0.0)
        if np.count_nonzero(candidate) > np.count_nonzero(strength):
            strength = candidate
        if np.count_nonzero(strength) >= _MIN_DEFECT_FRACTION * size * size:
            break
    _internal_assert(bool(strength.any()), f"synthetic {category}/{kind}: empty defect mask")
    alpha = strength[..., None]
    if kind == "scratch" and category in OBJECTS:
        out = image + rng.uniform(0.45, 0.65) * alpha * (1.0 - image)
    elif kind == "scratch" or kind == "crack":
        out = image * (1.0 - rng.uniform(0.45, 0.6 if kind == "scratch" else 0.75) * alpha)
    elif kind == "spot":
        amount = rng.uniform(0.4, 0.6) * alpha
        out = image * (1.0 - amount) if rng.random() < 0.5 else image + amount * (1.0 - image)
    elif kind == "stain":
        tint = _TINTS[rng.integers(len(_TINTS))]
        mix = rng.uniform(0.55, 0.75) * np.where(alpha > 0, np.minimum(1.0, alpha + 0.3), 0.0)
        out = image * (1.0 - mix) + mix * image.mean(axis=2, keepdims=True) * 1.3 * tint
    else:  # missing
        out = np.where(alpha > 0, behind, image)
    return np.clip(out, 0.0, 1.0), strength > 0


def draw_defect(rng: np.random.Generator, kind: str, image: np.ndarray, behind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One defect of ``kind`` drawn anywhere on a square float ``(S, S, 3)`` image in [0, 1], as in the test sets.

    ``behind`` is what a ``missing`` piece reveals (where it hardly differs from ``image``, a stain is
    drawn instead, since nothing would change). Returns the defective image and the mask of the
    changed pixels. Calibration draws these into held-out good images (``pyramidflow.pixel_threshold``).
    """
    if kind not in _SHAPES:
        raise ValueError(f"draw_defect: kind must be one of {DEFECT_TYPES}, got {kind!r}.")
    region = np.ones(image.shape[:2], dtype=bool)
    if kind == "missing" and not (np.abs(image - behind).max(axis=2) > 0.05).any():
        kind = "stain"
    return _apply_defect(rng, "", kind, image, behind, region)


# ----------------------------------------------------------------------------------------------------
# Writing the set.


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Global brightness, tint, illumination gradient and noise; returns uint8 pixels."""
    size = image.shape[0]
    x, y = _coords(size)
    direction = rng.uniform(0, 2 * np.pi)
    gradient = 1.0 + rng.uniform(0.0, 0.04) * (x * np.cos(direction) + y * np.sin(direction)) / (size / 2)
    gain = rng.uniform(0.96, 1.04) * (1.0 + rng.uniform(-0.015, 0.015, 3))
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(_NOISE_STD)
    out = (image * (gradient[..., None] * gain)).astype(np.float32) + noise
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    with atomic_write(path) as tmp:  # NOTE [atomic write]
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def generate(
    root: str | Path,
    *,
    seed: int = 0,
    size: int = 256,
    categories: Sequence[str] = CATEGORIES,
    num_train: int = 32,
    num_test: int = 4,
) -> Path:
    """Write a synthetic data set in the MVTec AD layout and return its root.

    Layout: ``<root>/<category>/train/good/000.png``, ``<root>/<category>/test/<type>/000.png`` for
    ``type`` in ``good`` and :data:`DEFECT_TYPES`, and ``<root>/<category>/ground_truth/<type>/000_mask.png``
    (0/255) for every defective test image. Every image is drawn from its own generator seeded by
    ``(seed, category, split, type, index)``, so the same arguments give identical bytes, and adding
    images never changes the others. Existing files of the same names are overwritten.

    Args:
        root: output folder (created if needed).
        seed: the seed; different seeds give different images.
        size: image height and width in pixels, at least 32.
        categories: which of :data:`CATEGORIES` to write.
        num_train: good training images per category (>= 1).
        num_test: test images per defect type, and good test images, per category (>= 1).

    Returns:
        ``Path(root)``, ready for :class:`pyramidflow.data.MVTecDataset`.

    Raises:
        ValueError: an unknown category, or a size or count out of range.
    """
    if isinstance(categories, str):
        categories = (categories,)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise ValueError(
            f"synthetic.generate: unknown categories {unknown or list(categories)}; choose from {list(CATEGORIES)}."
        )
    if int(size) != size or size < 32:
        raise ValueError(f"synthetic.generate: size must be an integer >= 32, got {size!r}.")
    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if int(value) != value or value < 1:
            raise ValueError(f"synthetic.generate: {name} must be an integer >= 1, got {value!r}.")
    size, root = int(size), Path(root)
    for category in dict.fromkeys(categories):
        code = zlib.crc32(category.encode())
        renderer = _RENDERERS[category](np.random.default_rng([seed, code, 0]), size)
        train = root / category / "train" / "good"
        train.mkdir(parents=True, exist_ok=True)
        for i in range(num_train):
            rng = np.random.default_rng([seed, code, 1, 0, i])
            image, _, _ = renderer.render(rng)
            _save(_finish(rng, image), train / f"{i:03d}.png")
        for t, kind in enumerate(("good",) + DEFECT_TYPES):
            folder = root / category / "test" / kind
            folder.mkdir(parents=True, exist_ok=True)
            if kind != "good":
                (root / category / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            for i in range(num_test):
                rng = np.random.default_rng([seed, code, 2, t, i])
                image, behind, region = renderer.render(rng)
                if kind != "good":
                    image, mask = _apply_defect(rng, category, kind, image, behind, region)
                    _save(mask.astype(np.uint8) * 255, root / category / "ground_truth" / kind / f"{i:03d}_mask.png")
                _save(_finish(rng, image), folder / f"{i:03d}.png")
    return root
