"""Cost of verifying cached vectors, against a cache read, at 60k x 768 float32 (184 MB).

Baseline ("a cache read"): what ``EmbeddingCache.load`` did before checksums (``np.load`` with
``mmap_mode="r"`` of vectors.npy, ids.npy, failed.json) plus touching every vector once
(``np.array(es.vectors)``), since the mmap alone reads nothing and every consumer reads all the
vectors next. Files are in the page cache (read once before timing). Medians of 15 runs.

Printed: the default verified load (size + stat signature checked on every read, bytes hashed
when the signature changed) and the full hash on every read (``EMBBENCH_VERIFY=full``), each as
a ratio of extra time over the baseline; xxh3_64 against BLAKE2b over the same bytes.
Run: ``python benchmarks/bench_cache.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash

from embbench.cache import EmbeddingCache


def median_ms(fn, n: int = 15) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def main() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((60_000, 768), dtype=np.float32)
    ids = [f"item-{i:06d}" for i in range(len(vectors))]
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache("bench", "m", "test", {"x": 1}, root=Path(tmp))
        cache.save_complete(vectors, ids, provenance={})
        folder = cache.path

        def baseline():
            v = np.load(folder / "vectors.npy", mmap_mode="r")
            np.load(folder / "ids.npy")
            json.loads((folder / "failed.json").read_text())
            return np.array(v)

        def verified():
            return np.array(cache.load().vectors)

        def full():
            os.environ["EMBBENCH_VERIFY"] = "full"
            try:
                return np.array(cache.load().vectors)
            finally:
                del os.environ["EMBBENCH_VERIFY"]

        baseline()
        verified()
        base, ver, ful = median_ms(baseline), median_ms(verified), median_ms(full)
        raw = memoryview(vectors).cast("B")
        xx = median_ms(lambda: xxhash.xxh3_64_hexdigest(raw))
        b2 = median_ms(lambda: hashlib.blake2b(raw, digest_size=16).hexdigest(), 3)
    print(f"cache read (baseline, old load + touch all vectors): {base:.1f} ms")
    print(
        f"verified load (default): {ver:.1f} ms; extra / read = {(ver - base) / base:+.1%}"
        " (target < 5%)"
    )
    print(
        f"full hash on every read (EMBBENCH_VERIFY=full): {ful:.1f} ms; extra / read = "
        f"{(ful - base) / base:+.1%}"
    )
    print(
        f"hash of 184 MB: xxh3_64 {xx:.1f} ms, blake2b {b2:.1f} ms; blake2b / xxh3 = {b2 / xx:.1f}x"
    )


if __name__ == "__main__":
    main()
