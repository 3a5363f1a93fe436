"""A development set of real photographed textures with defects drawn by a generator of its own.

Sources: images shipped inside the scikit-image wheel (no download): ``ihc`` (stained tissue,
``immunohistochemistry``), ``moon`` (the lunar surface, grey) and ``hubble`` (``hubble_deep_field``).
scikit-image's ``brick``, ``grass`` and ``gravel`` are kept for an independent check and never used here.
Each source is cut into crops, and no test pixel is ever in a training crop. Two splits:

- ``blocks`` (the default): the photograph is tiled into square blocks (twice the crop's side where
  that leaves at least two blocks a side, else the crop's side), coloured like a chessboard; training
  crops lie inside the white blocks, test crops inside the black ones. Both splits then sample every
  part of the photograph (top and bottom, left and right), so a photograph whose content drifts
  across it (ihc's tissue changes from its upper to its lower rows) gives good test crops from the
  training crops' distribution.
- ``rows``: training crops from the top 60% of rows, test crops from the rest. Good test crops of a
  photograph that drifts are then out of distribution (ihc: an image FPR of 0.62); kept because the
  tables of benchmarks/README.md before the "split" section used it.

The defects are drawn by this module, not by the demo's generator (:mod:`pyramidflow.data.synthetic`,
whose drawing the ``synthetic`` mask rule calibrates on), with shapes, blends and colours of their own:

- ``scratch``: a thin polyline of straight segments (1-2.5 px at 128 px), lighter or darker than the
  surface by 2-4 times the crop's spread (lighter on dark ground, darker on bright), anti-aliased;
- ``patch``: a polygon cut from a foreign photograph (the cat's fur, the astronaut, the coffee cup,
  the retina), its per-channel mean and spread matched to the pixels it replaces, edges feathered by a
  pixel;
- ``stain``: an irregular soft blob (a smoothed random field) of colour (mould green, coffee brown,
  violet ink, blue-grey), 25-60% opaque at its heart, fading towards its rim.

Each drawing is ``out = (1 - alpha) * image + alpha * target`` with ``alpha > 0`` exactly on the
written mask, so no pixel outside the mask changes. Written in the MVTec AD layout
(``<root>/<texture>/train/good``, ``test/<kind>``, ``ground_truth/<kind>/<name>_mask.png``); every
image is drawn from a generator seeded by ``(seed, texture, split, kind, index)``.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

TEXTURES = ("ihc", "moon", "hubble")
DEFECT_KINDS = ("scratch", "patch", "stain")
TRAIN_SHARE = 0.6  # of each source's rows: training crops above, test crops below (split "rows")
SPLITS = ("blocks", "rows")
BLOCK_ROOM = 0.25  # split "blocks": a block's side is at least (1 + this) times the crop's, where the photograph allows
_FOREIGN = ("chelsea", "astronaut", "coffee", "retina")  # what a cut-and-paste patch is cut from
_STAIN_TINTS = np.array([[0.55, 0.75, 0.35], [0.55, 0.35, 0.18], [0.55, 0.35, 0.75], [0.45, 0.55, 0.70]])


def kind_subsets(defect_types: Sequence[str], kinds: Sequence[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """The images each table row scores: ``("all", every image)``, then per defect kind its images and the good ones.

    ``kinds``: the rows' kinds in order (default: the kinds present, sorted, for a set of another layout).
    """
    types = np.asarray(defect_types)
    kinds = sorted(set(types.tolist()) - {"good"}) if kinds is None else kinds
    return [("all", np.ones(len(types), bool))] + [(kind, (types == kind) | (types == "good")) for kind in kinds]


def _skimage_image(name: str) -> np.ndarray:
    try:
        from skimage import data
    except ImportError as error:  # scikit-image is in the dev extra only
        raise ImportError("the development set reads images shipped with scikit-image: pip install -e '.[dev]'.") from error
    loaders: dict[str, Callable[[], np.ndarray]] = {
        "ihc": data.immunohistochemistry, "moon": data.moon, "hubble": data.hubble_deep_field,
        "chelsea": data.chelsea, "astronaut": data.astronaut, "coffee": data.coffee, "retina": data.retina,
    }
    image = loaders[name]()
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


Region = tuple[int, int, int, int]  # top, bottom, left, right: a crop lies inside one


def _crop(rng: np.random.Generator, source: np.ndarray, side: int, rows: tuple[int, int],
          cols: tuple[int, int] | None = None) -> np.ndarray:
    cols = (0, source.shape[1]) if cols is None else cols
    top = int(rng.integers(rows[0], rows[1] - side + 1))
    left = int(rng.integers(cols[0], cols[1] - side + 1))
    return source[top:top + side, left:left + side]


def _block_side(source: np.ndarray, side: int) -> int:
    """As many blocks along the shorter side as leave each room for crops at 1 + ``BLOCK_ROOM`` times the
    crop's side (so training crops are not all the same few), and at least two."""
    count = max(2, int(min(source.shape[:2]) // ((1 + BLOCK_ROOM) * side)))
    block = min(source.shape[:2]) // count
    if block < side:
        raise ValueError(f"devset: a crop of {side} px leaves fewer than 2x2 blocks of a {source.shape[0]}x"
                         f"{source.shape[1]} photograph; use --crop {min(source.shape[:2]) // 2} or less, or --split rows.")
    return block


def regions(source: np.ndarray, split: str, side: int, scheme: str = "blocks") -> list[Region]:
    """The parts of ``source`` that ``split``'s crops of ``side`` px are cut from, under ``scheme``."""
    if scheme == "rows":
        rows = _band(source, split, side)
        return [(rows[0], rows[1], 0, source.shape[1])]
    if scheme != "blocks":
        raise ValueError(f"devset: the split must be one of {SPLITS}, got {scheme!r}.")
    block = _block_side(source, side)
    parity = 0 if split == "train" else 1
    return [(r * block, (r + 1) * block, c * block, (c + 1) * block)
            for r in range(source.shape[0] // block) for c in range(source.shape[1] // block) if (r + c) % 2 == parity]


def _crop_in(rng: np.random.Generator, source: np.ndarray, side: int, parts: Sequence[Region]) -> np.ndarray:
    """A crop inside one of ``parts``, chosen with probability proportional to its number of crop positions."""
    if len(parts) == 1:  # draws nothing to choose, so the split "rows" writes the bytes it always wrote
        return _crop(rng, source, side, parts[0][:2], parts[0][2:])
    weights = np.array([(b - t - side + 1) * (r - l - side + 1) for t, b, l, r in parts], dtype=np.float64)
    top, bottom, left, right = parts[int(rng.choice(len(parts), p=weights / weights.sum()))]
    return _crop(rng, source, side, (top, bottom), (left, right))


def _band(source: np.ndarray, split: str, side: int) -> tuple[int, int]:
    cut = int(round(TRAIN_SHARE * source.shape[0]))
    rows = (0, cut) if split == "train" else (cut, source.shape[0])
    if rows[1] - rows[0] < side:
        raise ValueError(f"devset: a crop of {side} px does not fit the {split} band ({rows[1] - rows[0]} rows); use --crop "
                         f"{rows[1] - rows[0]} or less.")
    return rows


# ----------------------------------------------------------------------------------------------------
# Defects: each returns alpha (0 outside the defect, in (0, 1] on it) and the target colours.


def _polyline(rng: np.random.Generator, side: int) -> np.ndarray:
    """Dense (row, col) points of 2-4 straight segments, 0.3-0.7 of the side long in all."""
    count = int(rng.integers(2, 5))
    length = rng.uniform(0.3, 0.7) * side / count
    heading = rng.uniform(0, 2 * np.pi)
    corners = [rng.uniform(0.2, 0.8, 2) * side]
    for _ in range(count):
        heading += rng.uniform(-0.5, 0.5)
        corners.append(corners[-1] + length * np.array([np.sin(heading), np.cos(heading)]))
    t = np.linspace(0, 1, int(4 * length) + 2)[:, None]
    return np.vstack([(1 - t) * a + t * b for a, b in zip(corners[:-1], corners[1:])])


def _distance_to(points: np.ndarray, side: int) -> np.ndarray:
    axis = np.zeros((side, side), dtype=bool)
    rows, cols = np.rint(points).astype(int).T
    inside = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
    axis[rows[inside], cols[inside]] = True
    return ndimage.distance_transform_edt(~axis) if axis.any() else np.full((side, side), np.inf)


def _scratch(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    side = image.shape[0]
    width = rng.uniform(1.0, 2.5) * side / 128
    alpha = np.clip(width / 2 + 0.5 - _distance_to(_polyline(rng, side), side), 0.0, 1.0)
    alpha = np.where(alpha >= 0.25, alpha, 0.0)  # anti-aliased, without a halo of invisible changes
    spread = max(float(image.std()), 0.03)
    under = float(image[alpha > 0].mean()) if (alpha > 0).any() else 0.5
    lighter = rng.random() < 0.5 if 0.3 < under < 0.7 else under <= 0.3  # visible: not darker on black
    delta = (1.0 if lighter else -1.0) * rng.uniform(2.0, 4.0) * spread
    return alpha, np.clip(image + delta, 0.0, 1.0)


def _polygon(rng: np.random.Generator, side: int) -> np.ndarray:
    """A random star-shaped polygon, 0.15-0.35 of the side across."""
    centre = rng.uniform(0.25, 0.75, 2) * side
    count = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = rng.uniform(0.6, 1.0, count) * rng.uniform(0.075, 0.175) * side
    rows, cols = np.mgrid[:side, :side].astype(np.float64)
    theta = np.arctan2(rows - centre[0], cols - centre[1]) % (2 * np.pi)
    # The boundary radius at each angle, linear between the vertices (wrapping around).
    boundary = np.interp(theta, np.concatenate((angles - 2 * np.pi, angles, angles + 2 * np.pi)), np.tile(radii, 3))
    return np.hypot(rows - centre[0], cols - centre[1]) <= boundary


def _patch(rng: np.random.Generator, image: np.ndarray, foreign: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    side = image.shape[0]
    inside = _polygon(rng, side)
    if not inside.any():
        inside[side // 2, side // 2] = True
    source = foreign[int(rng.integers(len(foreign)))]
    scale = rng.uniform(0.6, 1.5)
    take = min(int(side * scale), min(source.shape[:2]))
    piece = _crop(rng, source, take, (0, source.shape[0]))
    piece = np.asarray(Image.fromarray(piece).resize((side, side), Image.BILINEAR), dtype=np.float64) / 255.0
    piece = np.rot90(piece, int(rng.integers(4)))
    replaced = image[inside]
    piece = (piece - piece[inside].mean(axis=0)) / (piece[inside].std(axis=0) + 1e-3)
    piece = piece * replaced.std(axis=0) + replaced.mean(axis=0)  # the grey levels of what it covers
    alpha = np.clip(ndimage.distance_transform_edt(inside) / 1.5, 0.0, 1.0)  # 1 px of feathering, 0 outside
    return alpha, np.clip(piece, 0.0, 1.0)


def _stain(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    side = image.shape[0]
    rows, cols = np.mgrid[:side, :side].astype(np.float64)
    centre = rng.uniform(0.25, 0.75, 2) * side
    radius = rng.uniform(0.08, 0.2) * side
    field = ndimage.gaussian_filter(rng.standard_normal((side, side)), sigma=radius / 3, mode="wrap")
    field /= field.std() + 1e-12
    level = 1.0 - np.hypot(rows - centre[0], cols - centre[1]) / radius + 0.25 * field
    inside = level > 0
    if not inside.any():
        inside = level >= level.max()
    depth = np.clip(level / max(float(level[inside].max()), 1e-6), 0.0, 1.0)
    opacity = rng.uniform(0.25, 0.6)
    alpha = np.where(inside, opacity * (0.3 + 0.7 * np.sqrt(depth)), 0.0)  # soft, fading towards the rim
    brightness = np.clip(1.2 * image[inside].mean(), 0.25, 1.0)
    return alpha, np.broadcast_to(_STAIN_TINTS[int(rng.integers(len(_STAIN_TINTS)))] * brightness, image.shape)


def draw(rng: np.random.Generator, kind: str, image: np.ndarray, foreign: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A defect of ``kind`` drawn on a uint8 ``(S, S, 3)`` crop: the uint8 defective crop and its bool mask."""
    pixels = image.astype(np.float64) / 255.0
    if kind == "scratch":
        alpha, target = _scratch(rng, pixels)
    elif kind == "patch":
        alpha, target = _patch(rng, pixels, foreign)
    elif kind == "stain":
        alpha, target = _stain(rng, pixels)
    else:
        raise ValueError(f"devset: defect kind must be one of {DEFECT_KINDS}, got {kind!r}.")
    out = (1.0 - alpha[..., None]) * pixels + alpha[..., None] * target
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), alpha > 0


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def build(
    root: str | Path,
    *,
    textures: Sequence[str] = TEXTURES,
    crop: int = 128,
    num_train: int = 40,
    num_test: int = 8,
    seed: int = 0,
    split: str = "blocks",
) -> Path:
    """Write the development set under ``root`` (MVTec AD layout) and return ``Path(root)``.

    Args:
        textures: which of :data:`TEXTURES`.
        crop: side of the crops in the source's pixels (written as they are).
        num_train: good training crops per texture.
        num_test: test crops per defect kind, and good test crops, per texture.
        seed: the seed; the same arguments write identical bytes.
        split: how training and test crops share the photograph (:data:`SPLITS`, the module's docstring).
    """
    unknown = [t for t in textures if t not in TEXTURES]
    if unknown:
        raise ValueError(f"devset: unknown textures {unknown}; choose from {list(TEXTURES)}.")
    root = Path(root)
    foreign = [_skimage_image(name) for name in _FOREIGN]
    for texture in textures:
        source = _skimage_image(texture)
        code = zlib.crc32(texture.encode())
        train_parts, test_parts = regions(source, "train", crop, split), regions(source, "test", crop, split)
        for i in range(num_train):
            rng = np.random.default_rng([seed, code, 0, 0, i])
            _save(_crop_in(rng, source, crop, train_parts), root / texture / "train" / "good" / f"{i:03d}.png")
        for k, kind in enumerate(("good",) + DEFECT_KINDS):
            for i in range(num_test):
                rng = np.random.default_rng([seed, code, 1, k, i])
                image = _crop_in(rng, source, crop, test_parts)
                if kind != "good":
                    image, mask = draw(rng, kind, image, foreign)
                    _save(mask.astype(np.uint8) * 255, root / texture / "ground_truth" / kind / f"{i:03d}_mask.png")
                _save(image, root / texture / "test" / kind / f"{i:03d}.png")
    return root
