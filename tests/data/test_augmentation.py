"""Texture augmentation draws the authors' distribution: every symmetry of the square equally often."""

import torch

from pyramidflow.data.transforms import random_flip_rotate


def _authors_draw(image, generator):
    """The authors' recipe, written out: h-flip, v-flip and one 90° rotation, each with p = 0.5."""
    if torch.rand((), generator=generator) < 0.5:
        image = image.flip(-1)
    if torch.rand((), generator=generator) < 0.5:
        image = image.flip(-2)
    if torch.rand((), generator=generator) < 0.5:
        image = torch.rot90(image, 1, dims=(-2, -1))
    return image


def _frequencies(draw, count=4000):
    image = torch.arange(4.0).reshape(1, 2, 2)  # four distinct corners: the 8 symmetries give 8 images
    generator = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(count):
        key = tuple(draw(image, generator).flatten().tolist())
        seen[key] = seen.get(key, 0) + 1
    return {k: v / count for k, v in seen.items()}


def test_flip_rotate_is_uniform_over_the_eight_symmetries_like_the_authors_recipe():
    ours = _frequencies(lambda image, g: random_flip_rotate(image, image[:1], generator=g)[0])
    authors = _frequencies(_authors_draw)
    assert set(ours) == set(authors) and len(ours) == 8
    for key in ours:
        assert abs(ours[key] - 1 / 8) < 0.02 and abs(authors[key] - 1 / 8) < 0.02, (key, ours[key], authors[key])
