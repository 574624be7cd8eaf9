"""Cost of a catalogue's fingerprint at 60k images: the first (cold) pass and a warm rerun.

The fingerprint hashes every image's bytes (xxh3-128); each hash is remembered with the file's
stat signature in an index under the cache folder (``embbench.filehash``), so a warm run only
stats the files. Generated: 60,000 distinct 64x64 JPEGs (about 1.3 KB each) in 600 class folders
of a temporary directory, listed in a manifest-like table. The files were just written, so the
cold pass reads them from the page cache: on a cold disk or a network share it is bounded by the
read rate of that storage instead (it happens once per file).

Printed: the old identity (the table hash alone, as before content hashing) for reference; the
cold pass (hash every file, write the index); the warm pass (stat every file; median of 5, each
on a new catalogue object, so nothing is remembered in memory); and a warm pass after one image
was replaced. Run: ``python benchmarks/bench_fingerprint.py [n_images]`` (target: warm < 2 s).

Measured once (60k images, 76.7 MB, local disk, this project's 2 shared cores at load ~5): table
hash alone 0.017 s; cold 4.34 s (13.8k files/s, index 6.5 MB); warm median 0.59 s (0.50-0.78);
warm after replacing one image 1.08 s (the index is rewritten).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def make_images(folder: Path, n: int, n_classes: int = 600) -> pd.DataFrame:
    """``n`` distinct small JPEGs in ``n_classes`` folders: one encoded picture per class, each
    file of it made unique by 8 bytes after the JPEG end marker (decoders ignore them)."""
    rng = np.random.default_rng(0)
    blobs = []
    for c in range(n_classes):
        buf = io.BytesIO()
        img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(img).save(buf, format="JPEG", quality=85)
        blobs.append(buf.getvalue())
        (folder / f"c{c:03d}").mkdir()
    rows = []
    for i in range(n):
        cls = f"c{i % n_classes:03d}"
        path = folder / cls / f"{i:06d}.jpg"
        path.write_bytes(blobs[i % n_classes] + i.to_bytes(8, "little"))
        rows.append((f"{cls}/{i:06d}.jpg", str(path), "test" if i % 5 else "train", cls))
    return pd.DataFrame(rows, columns=["item_id", "path", "split", "label"])


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60_000
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EMBBENCH_CACHE"] = str(Path(tmp) / "cache")
        from embbench.catalogue import Catalogue

        images = Path(tmp) / "images"
        images.mkdir()
        t = time.perf_counter()
        items = make_images(images, n)
        made = time.perf_counter() - t
        size = sum(Path(p).stat().st_size for p in items["path"])
        print(f"{n:,} JPEGs, {size / 1e6:.1f} MB, generated in {made:.1f} s")

        def catalogue() -> Catalogue:
            return Catalogue("bench", items.copy(), ("label",), "label", root=str(images))

        cat = catalogue()
        t = time.perf_counter()
        cols = ["item_id", "split", "label"]
        pd.util.hash_pandas_object(cat.items[cols].astype(str), index=False)
        print(
            f"table hash alone (the identity before content hashing): "
            f"{time.perf_counter() - t:.3f} s"
        )

        t = time.perf_counter()
        fp = cat.fingerprint()
        cold = time.perf_counter() - t
        index = sorted((Path(tmp) / "cache" / "file_hashes").glob("*.json"))
        print(
            f"cold (read + hash every file, write the index of "
            f"{sum(p.stat().st_size for p in index) / 1e6:.1f} MB): {cold:.2f} s "
            f"({n / cold:,.0f} files/s)"
        )

        warm = []
        for _ in range(5):
            again = catalogue()
            t = time.perf_counter()
            assert again.fingerprint() == fp
            warm.append(time.perf_counter() - t)
        print(
            f"warm (stat every file, no read): median {np.median(warm):.2f} s, "
            f"min {min(warm):.2f} s, max {max(warm):.2f} s (target < 2 s)"
        )

        Path(items["path"].iloc[123]).write_bytes(Path(items["path"].iloc[456]).read_bytes())
        changed = catalogue()
        t = time.perf_counter()
        assert changed.fingerprint() != fp
        print(f"warm after replacing one image (stat all, read 1): {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
