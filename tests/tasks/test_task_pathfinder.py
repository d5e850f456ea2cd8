"""Pathfinder: the generated label is the connectivity seen in the pixels; the LRA layout loader; the
built-in PNG decoder."""

from __future__ import annotations


import numpy as np
import pytest

from efficient_transformers.tasks import get_task
from efficient_transformers.tasks import pathfinder as P


def dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def markers_joined(image: np.ndarray, scene: dict, threshold: int, grow: int) -> bool:
    """Flood fill over ink pixels (> threshold, grown by ``grow`` pixels to close the dashes) from
    the first marker; is the second marker reached?"""
    ink = image > threshold
    for _ in range(grow):
        ink = dilate(ink)
    (x1, y1), (x2, y2) = (np.floor(m).astype(int) for m in scene["markers"])
    assert ink[y1, x1] and ink[y2, x2]
    reach = np.zeros_like(ink)
    reach[y1, x1] = True
    while True:
        new = dilate(reach) & ink
        if (new == reach).all():
            return bool(reach[y2, x2])
        reach = new


@pytest.mark.parametrize("size, threshold, grow, n", [(32, 0, 0, 40), (128, 60, 1, 16)])
def test_label_is_the_connectivity_in_the_pixels(size, threshold, grow, n):
    rng = np.random.default_rng(11)
    for i in range(n):
        label = i % 2
        image, scene = P.draw_scene(rng, label, size)
        assert image.shape == (size, size) and image.dtype == np.uint8
        assert markers_joined(image, scene, threshold, grow) == bool(label), i


def test_scene_geometry():
    rng = np.random.default_rng(2)
    for i in range(30):
        label = i % 2
        _, scene = P.draw_scene(rng, label, 32)
        g = scene["geometry"]
        snakes, (m1, m2), (s1, s2) = scene["snakes"], scene["markers"], scene["marker_snakes"]
        assert len(snakes) >= 2 and (s1 == s2) == bool(label)
        assert np.linalg.norm(m1 - m2) >= g["seed_distance"]
        for m, s in ((m1, s1), (m2, s2)):  # markers sit on an end of their snake
            assert min(np.linalg.norm(m - snakes[s][0]), np.linalg.norm(m - snakes[s][-1])) < 1e-9
        clear = g["paddle_thickness"] + 2 * g["paddle_margin"]
        for a in range(len(snakes)):
            for b in range(a + 1, len(snakes)):
                d = np.linalg.norm(snakes[a][:, None] - snakes[b][None], axis=-1).min()
                assert d >= 0.7 * clear, (i, a, b, d)


def test_classes_have_the_same_ink():
    ds = get_task("pathfinder").datasets(seed=0, num_train=120, num_val=0, num_test=0)["train"]
    ink = np.array([ds[i]["tokens"].double().mean().item() for i in range(len(ds))])
    labels = ds.labels
    assert abs(ink[labels == 1].mean() - ink[labels == 0].mean()) < 0.05 * ink.mean()


def test_path_x_size_and_default_length():
    ds = get_task("pathfinder").datasets(seed=0, size=64, num_train=2, num_val=1, num_test=1)["train"]
    assert len(ds[0]["tokens"]) == 64 * 64  # max_len=None keeps the whole image
    with pytest.raises(ValueError, match="size"):
        get_task("pathfinder").datasets(size=7, num_train=1, num_val=1, num_test=1)
    with pytest.raises(ValueError, match="paddle_length"):
        get_task("pathfinder").datasets(paddle_length="long", num_train=1, num_val=1, num_test=1)


QUICK_8 = dict(num_distractors=0, paddle_length=1.5, paddle_margin=0.75, paddle_thickness=1.0, marker_radius=0.75,
               seed_distance=3.0)  # the quick suite's 8x8 geometry (train/lra.py)


@pytest.mark.parametrize("size, contour_length, geometry", [(8, 2, QUICK_8), (16, 3, QUICK_8)])
def test_crisp_images_have_three_values_and_the_label_is_the_pixel_connectivity(size, contour_length, geometry):
    rng = np.random.default_rng(4)
    for i in range(40):
        label = i % 2
        image, scene = P.draw_scene(rng, label, size, contour_length, crisp=True, marker_value=128, **geometry)
        assert set(np.unique(image).tolist()) <= {0, 128, 255} and (image == 128).any() and (image == 255).any()
        (x1, y1), (x2, y2) = (np.floor(m).astype(int) for m in scene["markers"])
        assert image[y1, x1] == image[y2, x2] == 128
        assert P.pixels_joined(image, (y1, x1), (y2, x2)) == bool(label), i


def test_pixels_joined_takes_diagonal_steps_only_through_ink():
    image = np.zeros((4, 4), dtype=np.uint8)
    image[0, 0] = image[1, 1] = image[2, 2] = 255
    assert P.pixels_joined(image, (0, 0), (2, 2))
    image[1, 1] = 0
    assert not P.pixels_joined(image, (0, 0), (2, 2))


def test_marker_value_greys_the_markers_only():
    default = P.draw_pathfinder(np.random.default_rng(9), 1, 32)
    grey = P.draw_pathfinder(np.random.default_rng(9), 1, 32, marker_value=128)  # the same scene
    assert (grey <= default).all() and (grey < default).any()
    assert ((grey > 0) == (default > 0)).all()  # the same pixels inked


def test_new_options_reach_the_task_and_are_checked():
    ds = get_task("pathfinder").datasets(seed=0, size=8, contour_length=2, crisp=True, marker_value=128, **QUICK_8,
                                         num_train=8, num_val=2, num_test=2)["train"]
    tokens = np.stack([ds[i]["tokens"].numpy() for i in range(len(ds))])
    assert tokens.shape == (8, 64) and set(np.unique(tokens).tolist()) <= {1, 129, 256}
    for bad in (dict(crisp="yes"), dict(marker_value=0), dict(marker_value=256), dict(marker_value=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            get_task("pathfinder").datasets(**bad, num_train=1, num_val=1, num_test=1)


# -- PNG (Pillow) -------------------------------------------------------------------------------


def test_png_round_trip_and_colour_through_luma(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(11, 7), dtype=np.uint8)
    assert np.array_equal(P.decode_png(P.encode_png(gray)), gray)
    rgb = rng.integers(0, 256, size=(9, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    expected = (rgb.astype(np.int64) @ np.array([299, 587, 114]) + 500) // 1000  # Pillow's rounded ITU-R 601-2 luma
    assert np.abs(P.read_png(tmp_path / "c.png").astype(np.int64) - expected).max() <= 1
    rgba = np.concatenate([rgb, np.full((9, 6, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert np.array_equal(P.read_png(tmp_path / "a.png"), P.read_png(tmp_path / "c.png"))  # alpha ignored


def test_bad_png_data_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a....")
    with pytest.raises(ValueError, match=r"bad\.png: expected a PNG image"):
        P.read_png(bad)
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "g.gif")
    with pytest.raises(ValueError, match="not a PNG file"):
        P.read_png(tmp_path / "g.gif")
    with pytest.raises(FileNotFoundError, match="Pathfinder image not found"):
        P.read_png(tmp_path / "missing.png")


# -- the LRA layout loader ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fifty_images():
    return P.generate_images(np.random.default_rng(5), 50)


@pytest.fixture()
def layout(tmp_path, fifty_images):
    images, labels = fifty_images
    root = tmp_path / "pathfinder32" / "curv_contour_length_14"
    P.write_layout(root, images, labels, per_file=12)  # metadata/0.npy .. 4.npy
    return tmp_path, root, images, labels


def test_layout_round_trip_and_splits(layout):
    parent, root, images, labels = layout
    splits = get_task("pathfinder").datasets(root)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [40, 5, 5]  # 80 / 10 / 10
    by_pixels = {images[i].tobytes(): int(labels[i]) for i in range(len(images))}
    seen = []
    for split in ("train", "val", "test"):
        for i in range(len(splits[split])):
            item = splits[split][i]
            pixels = (item["tokens"].numpy() - 1).astype(np.uint8)
            assert len(pixels) == 1024 and item["tokens"].min() >= 1
            assert by_pixels[pixels.tobytes()] == item["label"]
            seen.append(pixels.tobytes())
    assert sorted(seen) == sorted(by_pixels)  # every image exactly once
    # the parent folder with a difficulty name finds the same data
    again = get_task("pathfinder").datasets(parent / "pathfinder32", difficulty="hard", num_train=3, max_len=100)
    assert len(again["train"]) == 3 and len(again["train"][0]["tokens"]) == 100
    assert again["train"][0]["tokens"].tolist() == splits["train"][0]["tokens"][:100].tolist()


def test_metadata_order_is_numeric(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = P.generate_images(rng, 24)
    P.write_layout(tmp_path, images, labels, per_file=2)  # metadata/0.npy .. 11.npy ("10" < "2" as text)
    paths, read_labels = P.read_metadata(tmp_path)
    assert [p.name for p in paths] == [f"sample_{i}.png" for i in range(24)]
    assert read_labels == [int(y) for y in labels]


def test_real_npy_metadata_is_read_without_pickle(layout):
    _, root, images, labels = layout
    rows = []
    for f in sorted((root / "metadata").glob("*.npy"), key=lambda p: int(p.stem)):
        rows += [line.split() for line in f.read_text().splitlines()]
        f.unlink()
    np.save(root / "metadata" / "0.npy", np.array(rows))
    splits = get_task("pathfinder").datasets(root)
    assert sum(len(d) for d in splits.values()) == 50


@pytest.mark.parametrize("line, what", [
    ("imgs/0 sample_0.png 0\n", "at least 4 fields"),
    ("imgs/0 sample_0.png 0 7\n", "label 0 or 1"),
])
def test_malformed_metadata_names_file_and_line(layout, line, what):
    _, root, _, _ = layout
    meta = root / "metadata" / "2.npy"
    meta.write_text(meta.read_text() + line)
    with pytest.raises(ValueError) as e:
        get_task("pathfinder").datasets(root)
    assert "2.npy:13" in str(e.value) and what in str(e.value)


def test_missing_image_and_metadata(layout):
    parent, root, _, _ = layout
    (root / "imgs" / "1" / "sample_20.png").unlink()
    with pytest.raises(FileNotFoundError, match="sample_20.png"):
        get_task("pathfinder").datasets(root)
    with pytest.raises(FileNotFoundError, match="metadata"):
        get_task("pathfinder").datasets(parent / "pathfinder32", difficulty="easy")
    with pytest.raises(ValueError, match="difficulty"):
        get_task("pathfinder").datasets(parent, difficulty="impossible")


def test_corrupt_png_is_named(layout):
    _, root, _, _ = layout
    splits = get_task("pathfinder").datasets(root)
    target = splits["val"].paths[0]
    target.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=target.name):
        splits["val"][0]
