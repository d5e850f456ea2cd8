"""Pathfinder and Path-X (LRA): are the two circular markers joined by a dashed path? 2 classes
(1 = connected), one token per pixel (``pixel + 1``, vocabulary 257), 32x32 = 1024 tokens
(Path-X: ``size=128``, 16,384 tokens).

Official format: the LRA release of Linsley et al.'s generator output. ``data_dir`` is a folder
holding ``metadata/`` and the image folders (e.g. ``pathfinder32/curv_contour_length_14``), or its
parent, in which case option ``difficulty`` picks ``easy`` = ``curv_baseline``, ``intermediate`` =
``curv_contour_length_9`` or ``hard`` = ``curv_contour_length_14`` (default). Assumptions about the
layout, taken from how LRA's TFDS builder and later readers (e.g. S4's) read it:

* every ``metadata/*.npy`` file is, despite its name, a text file: one example per line, fields
  separated by spaces, ``[subdir, img_filename, ?, label, ...]``; the image is
  ``data_dir/subdir/img_filename`` and the label (0 or 1) is field index 3. Files that really are
  NumPy ``.npy`` arrays (2-D, string dtype, same columns) are read too, without pickle.
* metadata files are taken in numeric order of their stem (``0.npy``, ``1.npy``, ..., then any
  non-numeric names alphabetically), rows in file order;
* images are PNG, 8-bit (grayscale, or colour converted to luma), all of the same size.

The release has no splits; as in LRA (80/10/10) a fixed permutation (independent of ``seed``) of
all rows gives train / val / test. Images are decoded lazily in ``__getitem__`` (the release holds
hundreds of thousands) by Pillow (8-bit grey, palette or RGB, with or without alpha; colour
through Pillow's luma). ``max_len=None`` keeps whole images.

Generator (``data_dir=None``), written from the description of Linsley's generator, not its code:
every image holds two long dashed "snakes" of ``contour_length`` paddles (short line segments of
``paddle_length`` separated by gaps of ``paddle_margin``, each turning from the previous one by a
random angle of at most ``max_turn`` degrees) and ``num_distractors`` short ones of
``contour_length // 3`` paddles. Two circular markers of radius ``marker_radius`` sit on snake ends:
both ends of the same long snake (label 1) or one end of each long snake (label 0), at least
``seed_distance`` apart, so both classes have the same amount of ink and markers at path ends.
Different snakes keep a centre-line clearance of ``paddle_thickness + 2 * paddle_margin`` from each
other and from the markers (checked on sample points along the paddles, so up to about a quarter
less in the worst case): their edges are about ``2 * paddle_margin`` apart, wider than the gaps
inside a snake (``paddle_margin - paddle_thickness``, as paddle ends are round), and the label is
exactly the connectivity (tested on the pixels). Snakes are placed by drawing a random shape and trying many rotations and
translations of it at once against an occupancy grid; a distractor that does not fit is left out.
Rendering is anti-aliased by supersampling, ink white (255) on black (0). Option ``crisp`` draws binary
ink instead (a pixel is 255 when at least half covered: few token values, 1-pixel strokes at small
sizes); an image whose markers are then not both drawn at their centre pixel, or whose markers'
8-neighbour connectivity through non-zero pixels differs from the label, is drawn again, so the
label is exactly the pixel connectivity. Option ``marker_value`` (default 255, the ink's) gives the
markers their own grey, so that they differ from the paths by value and not only by shape.

Differences from Linsley's generator: lengths are in output pixels; curvature is bounded by
``max_turn`` (LRA's ``continuity`` setting is not reproduced); no contrast jitter; approximate
geometry. Presets, with LRA's values where marked (used with this generator's meaning of the
names; other sizes scale the 32 preset): size 32 - ``paddle_length`` 1.5,
``paddle_margin`` 0.75, ``paddle_thickness`` 0.75, ``marker_radius`` 1.5 (LRA), ``seed_distance``
7 (LRA), ``max_turn`` 40, 5 distractors (LRA: 20 // (14 // 3)); size 128 (Path-X) - 5, 2.5,
1.5 (LRA), 3 (LRA), 20 (LRA), 30, 8 distractors (LRA: 35 // (14 // 3)). LRA's own 32x32
paddle length (2) and gap (1) do not leave room for two 14-paddle snakes here. Labels are balanced;
defaults 1000 / 200 / 200 images (about 5 ms each at 32x32). Sizes from 8 up (the quick suite's 8x8
Pathfinder: crisp, 2-paddle paths, see ``train/lra.py``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from torch.utils.data import Dataset

from .base import (
    BYTE_VOCAB,
    GENERATE,
    LOAD,
    ClassificationDataset,
    Ragged,
    Task,
    balanced_labels,
    check_index,
    data_error,
    fixed_permutation,
    missing_file,
    register_task,
    require_dir,
    split_rng,
)

DIFFICULTY = {"easy": "curv_baseline", "intermediate": "curv_contour_length_9", "hard": "curv_contour_length_14"}
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# ----------------------------------------------------------------------------------------------
# PNG reading and writing (Pillow)


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) uint8 grey pixels; colour is converted to luma by Pillow's ``convert("L")``
    (ITU-R 601-2: L = 0.299 R + 0.587 G + 0.114 B), alpha ignored. Not a PNG: ValueError."""
    with PILImage.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError(f"not a PNG file (format {im.format})")
        return np.asarray(im.convert("L"), dtype=np.uint8)


def read_png(path: Path) -> np.ndarray:
    """(H, W) uint8 grey pixels of a PNG file; malformed files raise ValueError naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise missing_file(path, "Pathfinder image") from None
    try:
        return decode_png(data)
    except Exception as e:  # noqa: BLE001  (any decoding failure means a malformed file)
        raise data_error(path, None, f"a PNG image [{type(e).__name__}: {e}]") from None


def encode_png(gray: np.ndarray) -> bytes:
    """(H, W) uint8 -> PNG bytes (8-bit grey)."""
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# the LRA layout


def write_layout(root: str | Path, images: np.ndarray, labels: np.ndarray, per_file: int = 1000) -> None:
    """Write images (n, H, W) uint8 in the layout the loader reads: ``imgs/{k}/sample_{i}.png`` and
    text metadata ``metadata/{k}.npy`` with rows ``imgs/{k} sample_{i}.png {i} {label}``."""
    root = Path(root)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, len(images), per_file)):
        sub = root / "imgs" / str(k)
        sub.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(start, min(start + per_file, len(images))):
            (sub / f"sample_{i}.png").write_bytes(encode_png(images[i]))
            lines.append(f"imgs/{k} sample_{i}.png {i} {int(labels[i])}\n")
        (root / "metadata" / f"{k}.npy").write_text("".join(lines))


def _metadata_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) for each example of one metadata file (text, or a real string .npy)."""
    data = path.read_bytes()
    if data.startswith(b"\x93NUMPY"):
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise data_error(path, None, f"a NumPy array of strings [{type(e).__name__}: {e}]") from None
        if arr.ndim != 2 or arr.dtype.kind not in "US":
            raise data_error(path, None, "a 2-D NumPy array of strings", f"{arr.dtype} {arr.shape}")
        return [(i + 1, [x.decode() if isinstance(x, bytes) else str(x) for x in row]) for i, row in enumerate(arr)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise data_error(path, None, f"UTF-8 text metadata ({e})") from None
    return [(i + 1, line.split()) for i, line in enumerate(text.splitlines()) if line.strip()]


def read_metadata(base: Path) -> tuple[list[Path], list[int]]:
    """All (image path, label) rows of ``base/metadata/*.npy``, in the documented order."""
    folder = require_dir(base / "metadata", "Pathfinder metadata folder")
    files = sorted(folder.glob("*.npy"), key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.name))
    if not files:
        raise data_error(folder, None, "metadata files *.npy", "none")
    paths, labels = [], []
    for f in files:
        for lineno, fields in _metadata_rows(f):
            if len(fields) < 4:
                raise data_error(f, lineno, "at least 4 fields [subdir, img_filename, ?, label]", " ".join(fields))
            if fields[3] not in ("0", "1"):
                raise data_error(f, lineno, "a label 0 or 1 in field 4 (index 3)", fields[3])
            paths.append(base / fields[0] / fields[1])
            labels.append(int(fields[3]))
    return paths, labels


class PathfinderFiles(Dataset):
    """Lazily decoded Pathfinder images: item = {"tokens": (H*W,) pixel + 1, "label": int}."""

    def __init__(self, paths: list[Path], labels: list[int], max_len: int | None):
        self.paths, self.labels, self.max_len = paths, np.asarray(labels, dtype=np.int64), max_len

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        i = check_index(i, len(self))
        pixels = read_png(self.paths[i]).reshape(-1)  # (H*W,)
        if self.max_len is not None:
            pixels = pixels[: self.max_len]
        return {"tokens": torch.from_numpy(pixels.astype(np.int64) + 1), "label": int(self.labels[i])}


# ----------------------------------------------------------------------------------------------
# the generator

PRESETS = {
    32: dict(paddle_length=1.5, paddle_margin=0.75, paddle_thickness=0.75, marker_radius=1.5, seed_distance=7.0,
             max_turn=40.0, num_distractors=20 // (14 // 3)),
    128: dict(paddle_length=5.0, paddle_margin=2.5, paddle_thickness=1.5, marker_radius=3.0, seed_distance=20.0,
              max_turn=30.0, num_distractors=35 // (14 // 3)),
}
GEOMETRY = ("paddle_length", "paddle_margin", "paddle_thickness", "marker_radius", "seed_distance", "max_turn",
            "num_distractors")


def preset(size: int) -> dict:
    """Generator geometry for an image size: the LRA-like presets, or the 32 preset scaled."""
    if size in PRESETS:
        return dict(PRESETS[size])
    s = size / 32
    p = dict(PRESETS[32])
    for key in ("paddle_length", "paddle_margin", "paddle_thickness", "marker_radius", "seed_distance"):
        p[key] *= s
    return p


class _Canvas:
    """Snake placement on an occupancy grid (``res`` cells per pixel): cells within the clearance of
    a placed snake (or marker) are blocked, and a candidate snake fits when none of the sample
    points along its paddles falls in a blocked cell or outside the border padding."""

    def __init__(self, rng: np.random.Generator, size: int, g: dict):
        self.rng, self.size, self.g = rng, size, g
        # centre-line distance kept between different snakes: their edges end up about
        # 2 * paddle_margin apart, wider than the gaps between the paddles of one snake
        self.clear = g["paddle_thickness"] + 2 * g["paddle_margin"]
        self.pad = max(1.0, g["marker_radius"])  # keep paths this far from the border
        self.res = 4 if size <= 64 else 2
        self.blocked = np.zeros((size * self.res, size * self.res), dtype=bool)  # (G, G)
        r = int(np.ceil(self.clear * self.res))
        dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
        keep = dy**2 + dx**2 <= (self.clear * self.res) ** 2
        self.disk = (dy[keep], dx[keep])  # offsets of the clearance disc, in cells
        self.n_samples = int(np.ceil(g["paddle_length"] / (self.clear / 4))) + 1  # sample points per paddle
        self.points: list[np.ndarray] = []  # sample points of each placed snake
        self.segments: list[tuple[np.ndarray, np.ndarray]] = []
        self.ends: list[tuple[np.ndarray, np.ndarray]] = []  # (start, end) point of each snake

    def _stamp(self, grid: np.ndarray, pts: np.ndarray) -> None:
        cells = np.floor(pts * self.res).astype(np.int64)  # (k, 2) as (x, y)
        ys = (cells[:, 1, None] + self.disk[0][None]).reshape(-1)
        xs = (cells[:, 0, None] + self.disk[1][None]).reshape(-1)
        ok = (ys >= 0) & (xs >= 0) & (ys < grid.shape[0]) & (xs < grid.shape[1])
        grid[ys[ok], xs[ok]] = True

    def _shape(self, n_paddles: int) -> np.ndarray | None:
        """A random snake shape, (n_paddles, k, 2) sample points starting at the origin, or None
        when it crosses itself. Headings turn by at most ``max_turn`` per paddle."""
        g, rng = self.g, self.rng
        turn = np.deg2rad(g["max_turn"])
        heading = np.cumsum(np.concatenate([[0.0], rng.uniform(-turn, turn, size=n_paddles - 1)]))  # (n,)
        dirs = np.stack([np.cos(heading), np.sin(heading)], axis=1)  # (n, 2)
        step = g["paddle_length"] + g["paddle_margin"]
        starts = np.concatenate([np.zeros((1, 2)), np.cumsum(step * dirs[:-1], axis=0)])  # (n, 2)
        t = np.linspace(0.0, g["paddle_length"], self.n_samples)[None, :, None]  # (1, k, 1)
        pts = starts[:, None] + t * dirs[:, None]  # (n, k, 2)
        if n_paddles > 2:
            flat = pts.reshape(-1, 2)
            paddle = np.repeat(np.arange(n_paddles), self.n_samples)
            far = np.abs(paddle[:, None] - paddle[None]) >= 2  # pairs of non-neighbouring paddles
            d2 = ((flat[:, None] - flat[None]) ** 2).sum(-1)
            if (d2[far] < self.clear**2).any():
                return None
        return pts

    def add_snake(self, n_paddles: int, shapes: int = 20, placements: int = 48) -> bool:
        """Place a snake: draw random shapes and, for each, try ``placements`` random rotations and
        translations at once; the first that stays inside the border padding and off blocked
        cells is kept."""
        rng, lo, hi = self.rng, self.pad, self.size - self.pad
        top = self.blocked.shape[0] - 1
        for _ in range(shapes):
            pts = self._shape(n_paddles)
            if pts is None:
                continue
            flat = pts.reshape(-1, 2)  # (P, 2)
            rot = rng.uniform(0, 2 * np.pi, size=placements)
            c, s = np.cos(rot), np.sin(rot)
            x = c[:, None] * flat[None, :, 0] - s[:, None] * flat[None, :, 1]  # (M, P) rotated
            y = s[:, None] * flat[None, :, 0] + c[:, None] * flat[None, :, 1]
            # translate uniformly within the range that keeps each placement inside [lo, hi]
            span_x = (hi - lo) - (x.max(1) - x.min(1))  # (M,)
            span_y = (hi - lo) - (y.max(1) - y.min(1))
            ok = (span_x >= 0) & (span_y >= 0)
            if not ok.any():
                continue
            x = x - x.min(1, keepdims=True) + lo + rng.uniform(0, 1, size=(placements, 1)) * np.maximum(span_x, 0)[:, None]
            y = y - y.min(1, keepdims=True) + lo + rng.uniform(0, 1, size=(placements, 1)) * np.maximum(span_y, 0)[:, None]
            cx = np.minimum((x * self.res).astype(np.int64), top)
            cy = np.minimum((y * self.res).astype(np.int64), top)
            ok &= ~self.blocked[cy, cx].any(axis=1)
            good = np.flatnonzero(ok)
            if not len(good):
                continue
            j = good[0]
            placed = np.stack([x[j], y[j]], axis=1).reshape(n_paddles, self.n_samples, 2)  # (n, k, 2)
            new = placed.reshape(-1, 2)
            self._stamp(self.blocked, new)
            self.points.append(new)
            self.segments += [(placed[i, 0], placed[i, -1]) for i in range(n_paddles)]
            self.ends.append((placed[0, 0], placed[-1, -1]))
            return True
        return False

    def marker_clear(self, centre: np.ndarray, snake: int) -> bool:
        """A marker on ``snake`` must keep its clearance from every other snake."""
        need = self.g["marker_radius"] + self.clear
        return all(np.linalg.norm(q - centre, axis=-1).min() >= need for i, q in enumerate(self.points) if i != snake)

    def add_obstacle(self, centre: np.ndarray) -> None:
        """Reserve a marker's disc so that distractors keep clear of it."""
        angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        ring = centre + self.g["marker_radius"] * np.stack([np.cos(angles), np.sin(angles)], 1)
        self._stamp(self.blocked, np.concatenate([ring, centre[None]]))


def _render(size: int, segments: list, markers: list, thickness: float, radius: float, *, crisp: bool = False,
            marker_value: int = 255) -> np.ndarray:
    """Drawing of paddles and marker discs -> (size, size) uint8: anti-aliased by supersampling (the
    default), or ``crisp``: a pixel is inked (255) when at least half of it is covered. Markers take
    ``marker_value`` (crisp: on pixels at least half covered by a disc, over any ink; anti-aliased:
    ``marker_value`` x the disc's coverage where that exceeds the path's ink)."""
    ss = 4 if size <= 64 else 2
    canvas = np.zeros((size * ss, size * ss), dtype=bool)  # (S, S) subpixels
    if segments:
        a = np.array([s[0] for s in segments]) * ss  # (K, 2) in subpixel units
        b = np.array([s[1] for s in segments]) * ss
        half = thickness * ss / 2
        lo = np.floor(np.minimum(a, b) - half - 1).astype(np.int64)  # (K, 2) window corner
        w = int(np.ceil(np.abs(b - a).max() + 2 * half + 3))
        off = np.arange(w)
        ix = lo[:, 0, None, None] + off[None, None, :]  # (K, 1, w)
        iy = lo[:, 1, None, None] + off[None, :, None]  # (K, w, 1)
        px, py = ix + 0.5, iy + 0.5
        ab = b - a
        t = ((px - a[:, 0, None, None]) * ab[:, 0, None, None] + (py - a[:, 1, None, None]) * ab[:, 1, None, None])
        t = np.clip(t / np.maximum((ab**2).sum(1), 1e-9)[:, None, None], 0, 1)  # (K, w, w)
        dx = px - (a[:, 0, None, None] + t * ab[:, 0, None, None])
        dy = py - (a[:, 1, None, None] + t * ab[:, 1, None, None])
        inside = dx**2 + dy**2 <= half**2
        ix, iy = np.broadcast_to(ix, inside.shape), np.broadcast_to(iy, inside.shape)
        keep = inside & (ix >= 0) & (iy >= 0) & (ix < size * ss) & (iy < size * ss)
        canvas[iy[keep], ix[keep]] = True
    yy, xx = np.mgrid[0 : size * ss, 0 : size * ss]
    discs = np.zeros_like(canvas)  # (S, S) subpixels inside a marker disc
    for c in markers:
        cx, cy = c * ss
        r = radius * ss
        discs |= (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r**2
    if not crisp and marker_value == 255:  # the historical rendering: one anti-aliased canvas
        cover = (canvas | discs).reshape(size, ss, size, ss).mean(axis=(1, 3))  # (size, size) coverage in [0, 1]
        return np.floor(cover * 255 + 0.5).astype(np.uint8)
    ink = canvas.reshape(size, ss, size, ss).mean(axis=(1, 3))  # (size, size) path coverage
    disc = discs.reshape(size, ss, size, ss).mean(axis=(1, 3))  # (size, size) marker coverage
    if crisp:
        image = np.where(ink >= 0.5, 255, 0)
        return np.where(disc >= 0.5, marker_value, image).astype(np.uint8)
    return np.floor(np.maximum(ink * 255, disc * marker_value) + 0.5).astype(np.uint8)


def pixels_joined(image: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether pixels ``a`` and ``b`` ((row, col)) are joined by non-zero pixels, 8-neighbour steps."""
    ink = image > 0  # (H, W)
    reach = np.zeros_like(ink)
    reach[a] = ink[a]
    while True:
        grown = np.pad(reach, 1)
        near = np.zeros_like(ink)
        for dy in range(3):
            for dx in range(3):
                near |= grown[dy : dy + ink.shape[0], dx : dx + ink.shape[1]]
        near &= ink
        if (near == reach).all():
            return bool(reach[b])
        reach = near


def _crisp_label_holds(image: np.ndarray, m1: np.ndarray, m2: np.ndarray, label: int, marker_value: int) -> bool:
    """Crisp images: each marker's centre pixel is drawn in the marker's value, and the markers are
    joined by 8-neighbour ink exactly when ``label`` is 1 (thin crisp strokes can lose a pixel)."""
    p1, p2 = ((int(m[1]), int(m[0])) for m in (m1, m2))  # (row, col) of the centres
    if image[p1] != marker_value or image[p2] != marker_value:
        return False
    return pixels_joined(image, p1, p2) == bool(label)


def draw_pathfinder(rng: np.random.Generator, label: int, size: int = 32, contour_length: int = 14,
                    **geometry) -> np.ndarray:
    """One (size, size) uint8 image; ``label`` 1 = the markers are joined by one snake."""
    return draw_scene(rng, label, size, contour_length, **geometry)[0]


def draw_scene(rng: np.random.Generator, label: int, size: int = 32, contour_length: int = 14, *,
               crisp: bool = False, marker_value: int = 255, **geometry) -> tuple[np.ndarray, dict]:
    """`draw_pathfinder` plus the scene: ``markers`` (two (x, y) centres), ``marker_snakes`` (the
    index of the snake each marker sits on), ``snakes`` (sample points along each snake's paddles,
    the two long ones first) and ``geometry``."""
    g = preset(size)
    g.update({k: v for k, v in geometry.items() if v is not None})
    for _ in range(200):
        cv = _Canvas(rng, size, g)
        if not cv.add_snake(contour_length):
            continue
        (a0, a1), = cv.ends
        if label == 1 and np.linalg.norm(a1 - a0) < g["seed_distance"]:
            continue  # cheap early retry: the markers would sit too close together
        if not cv.add_snake(contour_length):
            continue
        b0, b1 = cv.ends[1]
        if label == 1:
            options = [((a0, 0), (a1, 0))]
        else:  # one end of each long snake, in random order of preference
            options = [((a, 0), (b, 1)) for a in (a0, a1) for b in (b0, b1)]
            options = [options[k] for k in rng.permutation(4)]
        chosen = next(((m1, s1, m2, s2) for (m1, s1), (m2, s2) in options
                       if np.linalg.norm(m1 - m2) >= g["seed_distance"] and cv.marker_clear(m1, s1)
                       and cv.marker_clear(m2, s2)), None)
        if chosen is None:
            continue
        m1, s1, m2, s2 = chosen
        cv.add_obstacle(m1)
        cv.add_obstacle(m2)
        for _ in range(int(g["num_distractors"])):
            cv.add_snake(max(1, contour_length // 3), shapes=8)  # a distractor that does not fit is left out
        image = _render(size, cv.segments, [m1, m2], g["paddle_thickness"], g["marker_radius"], crisp=crisp,
                        marker_value=marker_value)
        if crisp and not _crisp_label_holds(image, m1, m2, label, marker_value):
            continue  # a pixel of the path or a marker lost to the threshold: draw again
        return image, {"markers": (m1, m2), "marker_snakes": (s1, s2), "snakes": cv.points, "geometry": g}
    raise ValueError(f"pathfinder: could not place the paths in a {size}x{size} image with {g}; "
                     "use a larger size or shorter contours")


def generate_images(rng: np.random.Generator, n: int, size: int = 32, contour_length: int = 14,
                    **geometry) -> tuple[np.ndarray, np.ndarray]:
    labels = balanced_labels(rng, n, 2)
    images = np.zeros((n, size, size), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i] = draw_pathfinder(rng, int(y), size, contour_length, **geometry)
    return images, labels


@register_task
class PathfinderTask(Task):
    """Pathfinder (32x32) / Path-X (size=128): are the two markers connected? 2 classes."""

    name = "pathfinder"
    kind = "classification"
    vocab_size = BYTE_VOCAB
    num_classes = 2
    default_max_len = 1024
    metric = "accuracy"
    default_sizes = (1000, 200, 200)  # about 5 ms per 32x32 image
    options = {
        "size": (32, GENERATE),
        "contour_length": (14, GENERATE),
        **{k: (None, GENERATE) for k in GEOMETRY},  # None -> the preset for the size
        "crisp": (False, GENERATE),  # binary ink instead of anti-aliasing
        "marker_value": (255, GENERATE),  # the markers' grey value (255 = the ink's)
        "difficulty": ("hard", LOAD),
    }

    def natural_max_len(self, opts):
        return int(opts.get("size", 32)) ** 2

    def data_shape(self, opts):
        size = int(opts.get("size", 32))
        return (size, size)

    def _generate(self, *, seed, max_len, sizes, size, contour_length, crisp, marker_value, **geometry):
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"pathfinder: size must be an int >= 8, got {size!r}")
        if not isinstance(contour_length, int) or contour_length < 2:
            raise ValueError(f"pathfinder: contour_length must be an int >= 2, got {contour_length!r}")
        if not isinstance(crisp, bool):
            raise ValueError(f"pathfinder: crisp must be true or false, got {crisp!r}")
        if not isinstance(marker_value, int) or isinstance(marker_value, bool) or not 1 <= marker_value <= 255:
            raise ValueError(f"pathfinder: marker_value must be an int in 1..255, got {marker_value!r}")
        for key, value in geometry.items():
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0
                                      or (key == "num_distractors" and not isinstance(value, int))):
                raise ValueError(f"pathfinder: {key} must be a non-negative number (an int for num_distractors), "
                                 f"got {value!r}")
        out = {}
        for split in ("train", "val", "test"):
            images, labels = generate_images(split_rng(seed, self.name, split), sizes[split], size, contour_length,
                                             crisp=crisp, marker_value=marker_value, **geometry)
            out[split] = ClassificationDataset(Ragged.from_matrix(images.reshape(len(images), size * size)), labels, shift=1,
                                               max_len=max_len)
        return out

    def _load(self, root, *, max_len, sizes, difficulty):
        if (root / "metadata").is_dir():
            base = root
        else:
            if difficulty not in DIFFICULTY:
                raise ValueError(f"pathfinder: difficulty must be one of {sorted(DIFFICULTY)}, got {difficulty!r}")
            base = root / DIFFICULTY[difficulty]
            if not (base / "metadata").is_dir():
                raise FileNotFoundError(f"Pathfinder metadata folder not found: neither {root / 'metadata'} "
                                        f"nor {base / 'metadata'} (difficulty={difficulty!r}) exists")
        paths, labels = read_metadata(base)
        order = fixed_permutation(len(paths))
        n_train = int(round(SPLIT_FRACTIONS[0] * len(paths)))
        n_val = int(round(SPLIT_FRACTIONS[1] * len(paths)))
        cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
        out = {}
        for split, idx in cuts.items():
            if sizes[split] is not None:
                idx = idx[: sizes[split]]
            split_paths = [paths[j] for j in idx]
            for p in split_paths:
                if not p.is_file():
                    raise missing_file(p, "Pathfinder image listed in the metadata")
            out[split] = PathfinderFiles(split_paths, [labels[j] for j in idx], max_len)
        return out
