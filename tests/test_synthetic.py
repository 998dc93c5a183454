"""The synthetic world: deterministic per seed, label maps that match the rendered regions, box annotations, the
evaluation-set writer and its errors."""

import numpy as np
import pytest
from PIL import Image

from ifseg_rt.world import (CATEGORY_NAMES, DEFAULT_DEMO_CATEGORIES, STUFF_NAMES, THING_NAMES, check_categories,
                                render_scene, scene_objects, write_dataset)


def test_world_size_and_names():
    assert 20 <= len(CATEGORY_NAMES) <= 40
    assert len(set(CATEGORY_NAMES)) == len(CATEGORY_NAMES)
    assert all(n.isalpha() and n.islower() for n in CATEGORY_NAMES)
    assert STUFF_NAMES and THING_NAMES
    assert len(DEFAULT_DEMO_CATEGORIES) >= 8 and set(DEFAULT_DEMO_CATEGORIES) <= set(CATEGORY_NAMES)


@pytest.mark.parametrize("size", [128, (80, 144)])
def test_deterministic_per_seed(size):
    a, b = render_scene(11, size), render_scene(11, size)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.objects == b.objects
    c = render_scene(12, size)
    assert not np.array_equal(a.image, c.image)
    h, w = (size, size) if isinstance(size, int) else size
    assert a.image.shape == (h, w, 3) and a.image.dtype == np.uint8 and a.labels.shape == (h, w)


def test_category_subset_and_single_stuff():
    s = render_scene(3, 64, ["water"])
    assert (s.labels == CATEGORY_NAMES.index("water")).all()
    assert s.names == ["water"]
    allowed = {CATEGORY_NAMES.index(n) for n in ("sky", "grass", "ball", "star")}
    for seed in range(20):
        assert set(np.unique(render_scene(seed, 96, ["sky", "grass", "ball", "star"]).labels)) <= allowed


def _signatures(size=96):
    """Mean colour of every category rendered on its own (things on a road background)."""
    sig = {}
    for i, n in enumerate(CATEGORY_NAMES):
        seed = 1
        while True:
            s = render_scene(seed, size, [n] if n in STUFF_NAMES else ["road", n], max_things=1)
            if n in s.names:
                break
            seed += 1
        sig[i] = s.image[s.labels == i].reshape(-1, 3).mean(0)
    return sig


def test_label_maps_match_rendered_regions():
    """Every labelled region looks like its category: its mean colour is nearest to that category's own colour
    signature among the categories of the scene; with the labels of a scene rotated the match collapses."""
    sig = _signatures()
    ok = rotated_ok = total = 0
    for seed in range(60):
        s = render_scene(seed, 128)
        present = [o.category for o in s.objects if o.area >= 150]
        for k, c in enumerate(present):
            mu = s.image[s.labels == c].reshape(-1, 3).mean(0)
            nearest = min(present, key=lambda p: np.abs(mu - sig[p]).sum())
            ok += nearest == c
            rotated_ok += nearest == present[(k + 1) % len(present)] if len(present) > 1 else 0
            total += 1
    assert total > 150
    assert ok / total >= 0.95
    assert rotated_ok / total < 0.2


def test_things_are_drawn_where_labelled():
    """A thing's pixels carry its colour: e.g. the ball is red, the ring blue, wherever the map says so."""
    for name, channel in (("ball", 0), ("ring", 2), ("diamond", 1)):
        found = 0
        for seed in range(40):
            s = render_scene(seed, 128, ["snow", "rock", name])
            c = CATEGORY_NAMES.index(name)
            if name not in s.names:
                continue
            px = s.image[s.labels == c].astype(float)
            others = np.delete(px, channel, axis=1).min(axis=1)
            assert np.median(px[:, channel] - others) > 60, (name, seed)
            found += 1
        assert found >= 5


def test_objects_are_boxes_of_the_label_map():
    s = render_scene(5, 128)
    assert s.objects == scene_objects(s.labels)
    assert [o.area for o in s.objects] == sorted((o.area for o in s.objects), reverse=True)
    assert sum(o.area for o in s.objects) == s.labels.size
    for o in s.objects:
        x0, y0, x1, y1 = o.box
        inside = s.labels[y0:y1, x0:x1] == o.category
        assert inside.sum() == o.area  # every pixel of the category lies in its box
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # tight


def test_write_dataset_label_encoding(tmp_path):
    names = ["sky", "grass", "ball"]
    pairs = write_dataset(tmp_path, [100, 101, 102], names, size=64)
    assert len(pairs) == 3
    for (img, lab), seed in zip(pairs, [100, 101, 102]):
        scene = render_scene(seed, 64, names)
        np.testing.assert_array_equal(np.asarray(Image.open(img)), scene.image)
        stored = np.asarray(Image.open(lab))
        expected = np.zeros_like(stored)
        for k, n in enumerate(names):
            expected[scene.labels == CATEGORY_NAMES.index(n)] = k + 1
        np.testing.assert_array_equal(stored, expected)
    # only things requested: the background belongs to other categories and is stored as 0 (ignore)
    (_, lab), = write_dataset(tmp_path / "things", [7], ["ball", "star"], size=64)
    assert (np.asarray(Image.open(lab)) == 0).any()


def test_category_errors():
    with pytest.raises(ValueError, match="unknown category 'giraffe'.*sky"):
        check_categories(["sky", "giraffe"])
    with pytest.raises(ValueError, match="empty"):
        check_categories([])
    with pytest.raises(ValueError, match="twice"):
        check_categories(["sky", "sky"])
    with pytest.raises(ValueError, match="too small"):
        render_scene(0, 8)
