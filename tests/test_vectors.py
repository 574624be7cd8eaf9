"""One L2 normaliser with one contract (embbench.vectors.l2_normalize), used everywhere."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import embbench
from embbench import embed, retrieval
from embbench.vectors import l2_normalize

PACKAGE = Path(embbench.__file__).parent
# Normalisers written by hand: a norm then a division (or a clamp of the norm before one).
HAND_MADE = re.compile(
    r"/=?\s*np\.maximum\(\s*norms|np\.linalg\.norm\([^)]*\)\s*$|/\s*np\.linalg\.norm"
)


def test_one_normaliser_in_the_package():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "vectors.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if HAND_MADE.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "L2 normalisation outside embbench.vectors:\n" + "\n".join(found)
    assert retrieval.l2_normalize is l2_normalize
    assert not hasattr(embed, "l2_normalize")


def test_zero_rows_are_refused_or_kept_never_divided_by_an_epsilon():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]], dtype=np.float64)
    with pytest.raises(ValueError, match="1 rows are all zeros"):
        l2_normalize(x, "x")
    kept = l2_normalize(x, "x", zero_rows="keep")
    assert kept.dtype == np.float32 and kept.flags.c_contiguous
    np.testing.assert_allclose(kept, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)


def test_unit_rows_are_left_bit_for_bit_under_both_policies():
    x = l2_normalize(np.random.default_rng(0).standard_normal((5, 7)))
    assert l2_normalize(x, zero_rows="keep") is x
