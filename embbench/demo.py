"""The demo catalogue: a synthetic product catalogue with real retrieval structure.

It is the embedded default dataset, so ``make demo`` and the notebook tests run with no
download. Each *category* is a product shape (mug, bottle, box, ...); each *product* in it has
its own colours, pattern and proportions; each *view* of a product differs in pose (rotation),
scale, position, background and lighting, like marketplace photos of one SKU. Retrieval by
``product`` is therefore a fine-grained task (like SOP's ``class_id``) and by ``category`` a
coarse one (like SOP's ``super_class_id``).

Splits are closed-set (every product has views in train, val and test) so the same catalogue
serves retrieval, top-tuning and fine-tuning. Generation is deterministic from the seed and
takes a few seconds; the images are written once under ``data_dir()/demo-<hash>/`` and reused.

Every item has a ``title`` that says what the image shows ("red striped mug": the product's
main colour named from a small palette, its pattern, its shape), every product class that title
as its name and every category its shape ("mug"), for text queries and class prompts. Titles
are metadata only: the images (and so every image cache) are the same as before titles existed;
a demo folder written before then gets its titles added on first read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from embbench._utils import hold_lock, stable_hash
from embbench.catalogue import Catalogue
from embbench.paths import data_dir

logger = logging.getLogger(__name__)

CATEGORIES = ("mug", "bottle", "box", "ball", "lamp", "shoe", "chair", "watch")
PATTERNS = ("solid", "stripes", "dots", "checker")
_VERSION = 1  # bump when rendering changes, so old folders are not reused (not for titles)
PATTERN_WORDS = {"solid": "", "stripes": "striped", "dots": "dotted", "checker": "checked"}
# The palette titles name colours from: basic colour terms and a typical sRGB value of each.
COLOUR_NAMES = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "red": (200, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (245, 220, 40),
    "green": (40, 150, 50),
    "blue": (30, 80, 210),
    "purple": (120, 50, 160),
    "pink": (240, 140, 180),
    "brown": (120, 70, 30),
}


def _lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0..255, last axis = channels."""
    c = np.asarray(rgb, dtype=float) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )


_PALETTE_LAB = _lab(np.array(list(COLOUR_NAMES.values())))


def colour_name(rgb: tuple[int, int, int] | list[int]) -> str:
    """The palette name (:data:`COLOUR_NAMES`) nearest to ``rgb`` in CIELAB."""
    dist = ((_PALETTE_LAB - _lab(np.array(rgb))) ** 2).sum(axis=1)
    return list(COLOUR_NAMES)[int(np.argmin(dist))]


def product_title(category: str, prod: dict) -> str:
    """What a product looks like, in words: ``"red striped mug"`` (a solid one: ``"red mug"``)."""
    words = (colour_name(prod["color"]), PATTERN_WORDS[prod["pattern"]], category)
    return " ".join(w for w in words if w)


def _render_product(draw: ImageDraw.ImageDraw, category: str, size: int, prod: dict) -> None:
    """Draw one product, centred, on a transparent canvas of ``size`` x ``size``."""
    c1, c2 = tuple(prod["color"]), tuple(prod["accent"])
    w = size * prod["width"]
    h = size * prod["height"]
    cx, cy = size / 2, size / 2
    box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    if category == "mug":
        draw.rectangle(box, fill=c1)
        draw.arc(
            (box[2] - w * 0.2, cy - h * 0.25, box[2] + w * 0.3, cy + h * 0.25),
            -90,
            90,
            fill=c2,
            width=max(2, size // 24),
        )
    elif category == "bottle":
        draw.rectangle((cx - w / 3, cy - h / 6, cx + w / 3, box[3]), fill=c1)
        draw.rectangle((cx - w / 8, box[1], cx + w / 8, cy - h / 6), fill=c2)
    elif category == "box":
        draw.rectangle(box, fill=c1, outline=c2, width=max(2, size // 20))
        draw.line((box[0], box[1], box[2], box[3]), fill=c2, width=max(1, size // 40))
    elif category == "ball":
        r = min(w, h) / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=c1)
        draw.arc(
            (cx - r, cy - r / 2, cx + r, cy + r / 2), 0, 180, fill=c2, width=max(2, size // 30)
        )
    elif category == "lamp":
        draw.polygon(
            [(cx - w / 2, cy), (cx + w / 2, cy), (cx + w / 5, box[1]), (cx - w / 5, box[1])],
            fill=c1,
        )
        draw.rectangle((cx - w / 16, cy, cx + w / 16, box[3]), fill=c2)
        draw.rectangle((cx - w / 3, box[3] - h / 12, cx + w / 3, box[3]), fill=c2)
    elif category == "shoe":
        draw.polygon(
            [
                (box[0], box[3]),
                (box[2], box[3]),
                (box[2], cy + h / 6),
                (cx, cy - h / 8),
                (box[0], box[1] + h / 4),
            ],
            fill=c1,
        )
        draw.rectangle((box[0], box[3] - h / 10, box[2], box[3]), fill=c2)
    elif category == "chair":
        t = max(2, size // 18)
        draw.rectangle((box[0], box[1], box[0] + t * 1.5, box[3]), fill=c1)
        draw.rectangle((box[0], cy, box[2], cy + t * 1.5), fill=c2)
        draw.rectangle((box[2] - t * 1.5, cy, box[2], box[3]), fill=c1)
    elif category == "watch":
        r = min(w, h) / 3
        draw.rectangle((cx - r / 2, box[1], cx + r / 2, box[3]), fill=c2)
        draw.ellipse(
            (cx - r, cy - r, cx + r, cy + r), fill=c1, outline=c2, width=max(2, size // 40)
        )
        draw.line((cx, cy, cx + r * 0.7, cy - r * 0.3), fill=c2, width=max(1, size // 50))
    else:  # pragma: no cover - CATEGORIES is closed
        raise ValueError(category)


def _pattern_mask(size: int, pattern: str, period: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    if pattern == "stripes":
        m = (xx + yy) // period % 2 == 0
    elif pattern == "dots":
        m = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 4) ** 2
    elif pattern == "checker":
        m = (xx // period + yy // period) % 2 == 0
    else:
        m = np.zeros((size, size), bool)
    return Image.fromarray((m * 255).astype(np.uint8), "L")


def _product_sprite(category: str, prod: dict, size: int) -> Image.Image:
    sprite = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    _render_product(ImageDraw.Draw(sprite), category, size, prod)
    if prod["pattern"] != "solid":
        overlay = Image.new("RGBA", (size, size), tuple(prod["accent"]) + (255,))
        mask = _pattern_mask(size, prod["pattern"], prod["period"])
        alpha = sprite.getchannel("A")
        mask = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(alpha)))
        sprite.paste(overlay, (0, 0), mask)
    return sprite


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    a = rng.integers(120, 256, 3)
    b = rng.integers(120, 256, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    grad = (a * (1 - t) + b * t).astype(np.float32)
    img = np.broadcast_to(grad, (size, size, 3)).copy()
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _view(sprite: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    bg = _background(rng, size)
    angle = float(rng.uniform(-35, 35))
    scale = float(rng.uniform(0.6, 1.0))
    s = max(8, int(size * scale))
    obj = sprite.rotate(angle, resample=Image.BILINEAR, expand=False).resize((s, s), Image.BILINEAR)
    dx = int(rng.integers(0, size - s + 1))
    dy = int(rng.integers(0, size - s + 1))
    bg.paste(obj, (dx, dy), obj)
    bg = ImageEnhance.Brightness(bg).enhance(float(rng.uniform(0.7, 1.3)))
    bg = ImageEnhance.Contrast(bg).enhance(float(rng.uniform(0.8, 1.2)))
    if rng.random() < 0.3:
        bg = bg.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return bg


def make_demo_catalogue(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    n_categories: int = 8,
    products_per_category: int = 12,
    views: tuple[int, int, int] = (6, 2, 4),
    image_size: int = 96,
) -> Catalogue:
    """Generate (once) and load the synthetic demo catalogue.

    Args:
        root: Parent folder; default ``data_dir()``. Images go to ``root/demo-<hash>/``.
            A generated ``demo-<hash>`` folder itself (a result record's ``dataset_root``) is
            read as it is, whatever the other arguments say.
        seed: Everything (colours, patterns, poses, backgrounds) derives from it.
        n_categories: Number of product shapes, at most ``len(CATEGORIES)``.
        products_per_category: Products (retrieval classes) per category.
        views: Views per product in train, val and test.
        image_size: Side of the square JPEGs in pixels.

    Returns:
        A catalogue named ``demo`` with labels ``product`` (default) and ``category``, the
        text column ``title`` and class names (a product's title, a category's shape).
    """
    if root is not None and (Path(root) / "spec.json").is_file():
        spec = json.loads((Path(root) / "spec.json").read_text())
        return _load(Path(root), spec)
    if not 1 <= n_categories <= len(CATEGORIES):
        raise ValueError(f"n_categories={n_categories} must be in 1..{len(CATEGORIES)}")
    if products_per_category < 1 or min(views) < 1:
        raise ValueError(
            f"products_per_category={products_per_category} and views={views} must be positive"
        )
    spec = dict(
        seed=seed,
        n_categories=n_categories,
        products_per_category=products_per_category,
        views=list(views),
        image_size=image_size,
        version=_VERSION,
    )
    folder = Path(root) if root is not None else data_dir()
    folder = folder / f"demo-{stable_hash(spec, 10)}"
    if not _complete(folder):
        # two processes loading the demo at once (`embbench demo` runs 01 and 02 together) must
        # not both write it: the second waits and finds it complete (a hidden lock file beside)
        with hold_lock(folder.with_name(f".{folder.name}.lock"), f"demo catalogue {folder}"):
            if not _complete(folder):
                _generate(folder, spec)
    return _load(folder, spec)


def _complete(folder: Path) -> bool:
    return (folder / "manifest.csv").is_file() and (folder / "spec.json").is_file()


def _load(folder: Path, spec: dict) -> Catalogue:
    """The catalogue of a generated demo folder (titles added to a folder written without)."""
    manifest = folder / "manifest.csv"
    items = pd.read_csv(
        manifest,
        dtype={
            "item_id": str,
            "path": str,
            "split": str,
            "product": str,
            "category": str,
            "title": str,
        },
    )
    if "title" not in items:
        items = _add_titles(folder, spec, items)
    items["path"] = [str(folder / p) for p in items["path"]]
    products = items.drop_duplicates("product")
    return Catalogue(
        name="demo",
        items=items,
        label_columns=("product", "category"),
        default_label="product",
        root=str(folder),
        source={"loader": "demo", **spec},
        text_columns=("title",),
        name_maps={
            "product": dict(zip(products["product"], products["title"], strict=True)),
            "category": {c: c for c in products["category"]},
        },
    )


def _add_titles(folder: Path, spec: dict, items: pd.DataFrame) -> pd.DataFrame:
    """``items`` with the titles of a demo folder written before titles existed.

    The products are drawn again from the seed (the views too, as they share the random
    stream; nothing is written but the manifest's new ``title`` column and ``products.json``).
    """
    products = {}
    for category, product, prod, *_ in _walk(spec):
        products[product] = {"category": category, **prod, "title": product_title(category, prod)}
    items = items.assign(title=[products[p]["title"] for p in items["product"]])
    try:
        _write_metadata(folder, items, products)
        logger.info("demo catalogue %s: titles added to its manifest", folder)
    except OSError as err:  # a read-only copy: titles stay in memory
        logger.warning("demo catalogue %s: cannot add titles to its manifest (%s)", folder, err)
    return items


def _write_metadata(folder: Path, items: pd.DataFrame, products: dict) -> None:
    """Write ``manifest.csv`` and ``products.json`` (each product's drawn spec and title)."""
    for name, text in (
        ("products.json", json.dumps(products, indent=1)),
        ("manifest.csv", items.to_csv(index=False)),
    ):
        tmp = folder / f"{name}.tmp{os.getpid()}"
        tmp.write_text(text)
        tmp.replace(folder / name)


def _walk(spec: dict):
    """Draw the demo: yield ``(category, product, prod, split, view, image)`` in order.

    Products and their views share one random stream, so the order of the draws is the
    identity of the images; the yielded images are rendered, not written.
    """
    rng = np.random.default_rng(spec["seed"])
    size = spec["image_size"]
    split_names = ("train", "val", "test")
    for ci in range(spec["n_categories"]):
        category = CATEGORIES[ci]
        for pi in range(spec["products_per_category"]):
            product = f"{category}-{pi:03d}"
            prod = {
                "color": rng.integers(0, 256, 3).tolist(),
                "accent": rng.integers(0, 256, 3).tolist(),
                "pattern": PATTERNS[int(rng.integers(len(PATTERNS)))],
                "period": int(rng.integers(4, 12)),
                "width": float(rng.uniform(0.45, 0.85)),
                "height": float(rng.uniform(0.45, 0.85)),
            }
            sprite = _product_sprite(category, prod, size)
            v = 0
            for split, n in zip(split_names, spec["views"], strict=True):
                for _ in range(n):
                    yield category, product, prod, split, v, _view(sprite, rng, size)
                    v += 1


def _generate(folder: Path, spec: dict) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    rows = []
    products: dict[str, dict] = {}
    for category, product, prod, split, v, image in _walk(spec):
        (tmp / "images" / category).mkdir(parents=True, exist_ok=True)
        rel = f"images/{category}/{product}_{v:02d}.jpg"
        image.save(tmp / rel, quality=90)
        title = product_title(category, prod)
        products.setdefault(product, {"category": category, **prod, "title": title})
        rows.append((rel, rel, split, product, category, title))
    items = pd.DataFrame(rows, columns=["item_id", "path", "split", "product", "category", "title"])
    _write_metadata(tmp, items, products)
    (tmp / "spec.json").write_text(json.dumps(spec, indent=2))
    if folder.exists():  # a half-written folder from a killed run
        import shutil

        shutil.rmtree(folder)
    tmp.replace(folder)
    logger.info("demo catalogue: %d images written to %s", len(rows), folder)
