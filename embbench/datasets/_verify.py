"""Check a local copy of a dataset and say what to fix (``embbench verify <name> [--root R]``).

Checks the layout, counts images and classes against the published counts, lists missing and
unreadable files. A wrong root or a half-extracted archive gives a message naming what was
expected where, never a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from embbench._registry import UnknownNameError
from embbench.catalogue import Catalogue, CatalogueError
from embbench.datasets._common import existing_mask
from embbench.datasets._factory import create_catalogue
from embbench.datasets._params import DatasetParamsError
from embbench.datasets._registry import get_dataset_info, list_datasets
from embbench.images import DEFAULT_MAX_PIXELS, check_image, is_truncation_tolerant

logger = logging.getLogger(__name__)

_SHOW = 10  # examples listed per kind of problem


@dataclass
class VerifyReport:
    """The result of :func:`verify`.

    Attributes:
        name: Dataset name.
        root: The folder examined (the dataset folder found below the given root, if any).
        ok: No problems: the copy can be used as is.
        variant: Layout variant detected.
        split_scheme: Split scheme of the catalogue that was checked.
        counts: Images per split.
        classes: Classes (of the default label) per split, and ``all``.
        expected: Published counts compared against (``images``, ``classes``, official splits).
        differences: Found minus published, for each key of ``expected``.
        missing: Image files the annotations list but the folder lacks.
        unreadable: ``(path, reason)`` of files that do not decode.
        checked_images: How many images were decoded.
        problems: What is wrong, each naming the path and the fix.
        notes: Remarks that are not problems (subset copies, known publisher quirks).
    """

    name: str
    root: str
    ok: bool = False
    variant: str | None = None
    split_scheme: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    differences: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    checked_images: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-friendly dict (for results records and notebooks)."""
        return asdict(self)

    def format(self) -> str:
        """The report as text for people: verdict, counts table, problems, notes."""
        head = f"{self.name} at {self.root}"
        if self.variant:
            head += f" (layout {self.variant}"
            head += f", split scheme {self.split_scheme})" if self.split_scheme else ")"
        lines = [f"{head}: {'OK' if self.ok else 'PROBLEMS FOUND'}"]
        if self.counts:
            lines.append(f"  {'split':<8}{'images':>12}{'classes':>10}{'published':>12}")
            for split in [*self.counts, "all"]:
                n = sum(self.counts.values()) if split == "all" else self.counts[split]
                key = "images" if split == "all" else split
                pub = self.expected.get(key)
                lines.append(
                    f"  {split:<8}{n:>12,}{self.classes.get(split, 0):>10,}"
                    f"{(f'{pub:,}' if pub is not None else '-'):>12}"
                )
            if "classes" in self.expected:
                lines.append(
                    f"  classes: {self.classes.get('all', 0):,} "
                    f"(published {self.expected['classes']:,})"
                )
        if self.checked_images:
            lines.append(
                f"  decoded {self.checked_images:,} images: {len(self.unreadable):,} unreadable"
            )
        if self.problems:
            lines.append(f"Problems ({len(self.problems)}):")
            lines.extend(f"  - {p}" for p in self.problems)
        if self.notes:
            lines.append("Notes:")
            lines.extend(f"  - {n}" for n in self.notes)
        return "\n".join(lines)


def _missing_problem(cat: Catalogue, missing: list[str]) -> str:
    by_parent: dict[str, int] = defaultdict(int)
    for p in missing:
        by_parent[str(Path(p).parent)] += 1
    gone = sorted(d for d in by_parent if not Path(d).is_dir())
    total = len(cat.items)
    msg = (
        f"{len(missing):,} of {total:,} images listed in the annotations are missing under "
        f"{cat.root}, e.g. {missing[0]}"
    )
    if gone:
        shown = ", ".join(gone[:5]) + (f", ... ({len(gone)} folders)" if len(gone) > 5 else "")
        msg += (
            f". Whole folders are absent: {shown}. The archive looks partly extracted: "
            "extract it again completely"
        )
    else:
        msg += ". Re-extract or re-download the missing files"
    return msg + " (or pass drop_missing=True to use only the images you have)."


def _count_notes(
    report: VerifyReport, cat: Catalogue, info_published: dict, published_splits: dict[str, int]
) -> None:
    counts = report.counts
    val_from = cat.source.get("val_from")
    found = {"images": sum(counts.values()), "classes": report.classes.get("all", 0)}
    for split in published_splits:
        if split == "train" and val_from == "train":
            found["train"] = counts.get("train", 0) + counts.get("val", 0)
        else:
            found[split] = counts.get(split, 0)
    classes = info_published.get("classes", {}).get(cat.default_label)
    expected = {"images": info_published.get("images"), "classes": classes, **published_splits}
    expected = {k: v for k, v in expected.items() if v is not None}
    report.expected = expected
    report.differences = {k: found[k] - v for k, v in expected.items() if k in found}
    off = {k: d for k, d in report.differences.items() if d}
    if not off:
        return
    if found["images"] < expected.get("images", 0):
        report.notes.append(
            f"this copy has {found['images']:,} images, the published dataset "
            f"{expected['images']:,} ({off.get('images', 0):+,}): a subset is fine for trials, "
            "but results are not comparable with published ones"
        )
    else:
        details = ", ".join(f"{k} {found[k]:,} vs {expected[k]:,}" for k in off)
        report.notes.append(f"counts differ from the published ones: {details}")
    if val_from == "train" and "train" in off:
        report.notes.append("published train = train + val here (val is carved from train)")


def _check_decodes(paths: list[str], workers: int) -> list[tuple[str, str]]:
    bad = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda p: (p, check_image(p, max_pixels=DEFAULT_MAX_PIXELS)), paths)
        for path, reason in tqdm(
            results,
            total=len(paths),
            desc="decoding images",
            unit="img",
            leave=False,
            disable=len(paths) < 500,
        ):
            if reason is not None:
                bad.append((path, reason))
    return bad


def verify(
    name: str,
    root: str | Path | None = None,
    *,
    check_images: bool = True,
    max_images: int = 0,
    seed: int = 0,
    workers: int | None = None,
    **options: object,
) -> VerifyReport:
    """Check a local copy of a dataset and say what to fix; never raises for a bad copy.

    Args:
        name: Dataset name (:func:`~embbench.datasets.list_datasets`).
        root: Its folder (default ``data_dir()/<name>``); for ``manifest`` the CSV path.
        check_images: Decode images to find truncated or corrupt files.
        max_images: Decode at most this many (a seeded sample; 0 = all).
        seed: Seed of the sample.
        workers: Decoding threads (default: CPU count, at most 8).
        **options: Passed to :func:`~embbench.datasets.create_catalogue` (``variant``,
            ``split_scheme``...).

    Returns:
        The report (``ok`` is False when there are problems).

    Raises:
        UnknownNameError: ``name`` is not a registered dataset.
    """
    report = VerifyReport(name=name, root=str(root) if root is not None else "(default root)")
    try:
        info = get_dataset_info(name)
    except DatasetParamsError as err:
        report.problems.append(str(err))
        return report
    try:
        cat = create_catalogue(name, root, **options)
    except UnknownNameError:
        raise
    except (CatalogueError, OSError, ValueError, TypeError) as err:
        report.problems.append(str(err))
        return report
    except Exception as err:  # never a stack trace for a damaged copy
        logger.debug("verify %s: unexpected error", name, exc_info=True)
        report.problems.append(
            f"could not read the dataset ({type(err).__name__}: {err}); the copy is damaged or "
            "not the published one"
        )
        return report
    report.root = cat.root
    report.variant = cat.source.get("variant")
    report.split_scheme = cat.source.get("split_scheme")
    items = cat.items
    for split in cat.splits:
        rows = items[items["split"] == split]
        report.counts[split] = len(rows)
        report.classes[split] = int(rows[cat.default_label].nunique())
    report.classes["all"] = int(items[cat.default_label].nunique())
    report.problems.extend(cat.source.get("problems", []))
    report.notes.extend(cat.source.get("notes", []))
    published = info.published if info.published else {}
    if published:
        _count_notes(report, cat, published, info.published_splits(report.split_scheme))
    # Files the loader already dropped (Fashion ids without image) beyond the known ones.
    known = set(info.known_missing)
    dropped = [m for m in cat.source.get("missing", []) if m not in known]
    if dropped:
        report.missing.extend(str(Path(cat.root) / m) for m in dropped)
        report.problems.append(
            f"{len(dropped):,} annotated images are missing under {cat.root}, e.g. {dropped[0]} "
            "(they were left out); extract the images folder again completely"
        )
    urls = items["path"].astype(str).str.startswith(("http://", "https://"))
    if urls.any():
        report.notes.append(
            f"{int(urls.sum()):,} rows are URLs: fetch them first with "
            "embbench.datasets.fetch_urls (not checked here)"
        )
    present = existing_mask(items["path"])
    absent = items["path"][~present & ~urls.to_numpy()].astype(str).tolist()
    if absent:
        report.missing.extend(absent)
        report.problems.append(_missing_problem(cat, absent))
    if check_images:
        candidates = items["path"][present & ~urls.to_numpy()].astype(str).tolist()
        if max_images and len(candidates) > max_images:
            rng = np.random.default_rng(seed)
            pick = np.sort(rng.choice(len(candidates), size=max_images, replace=False))
            candidates = [candidates[i] for i in pick]
        n_workers = workers or min(8, os.cpu_count() or 1)
        report.unreadable = _check_decodes(candidates, n_workers)
        report.checked_images = len(candidates)
        if report.unreadable:
            shown = "; ".join(f"{p}: {r}" for p, r in report.unreadable[:3])
            report.problems.append(
                f"{len(report.unreadable):,} of {len(candidates):,} decoded images are "
                f"unreadable ({shown}); download them again (embedding skips and reports them "
                "meanwhile)"
            )
        if is_truncation_tolerant():
            report.notes.append(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process, so truncated "
                "images decode with gray rows instead of failing"
            )
    if len(report.missing) > _SHOW:
        logger.info(
            "%s: %d missing files (report.missing lists them all)", name, len(report.missing)
        )
    report.ok = not report.problems
    return report


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``verify`` command's arguments (added to ``parser`` when given)."""
    parser = parser or argparse.ArgumentParser(
        prog="embbench verify",
        description="Check a local copy of a dataset: layout, counts, missing and unreadable "
        "files, and what to fix.",
    )
    parser.add_argument("name", help=f"dataset name ({', '.join(list_datasets())})")
    parser.add_argument(
        "--root",
        default=None,
        help="dataset folder (default: data_dir()/<name>); manifest: CSV path",
    )
    parser.add_argument(
        "--variant", default=None, help="force a layout variant (cars196: devkit or metric)"
    )
    parser.add_argument(
        "--split-scheme",
        default=None,
        choices=["classification", "dml"],
        help="split scheme to check (default from params/datasets.yaml)",
    )
    parser.add_argument(
        "--no-images",
        action="store_true",
        help="do not decode images (faster: layout, counts, missing files only)",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=0,
        help="decode at most this many images, a seeded sample (0 = all)",
    )
    parser.add_argument(
        "--list-missing", action="store_true", help="print every missing and unreadable file"
    )
    return parser


def verify_main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print the report; exit status 0 = OK, 1 = problems, 2 = bad usage.

    Args:
        argv: Arguments after ``verify`` (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = build_parser().parse_args(argv)
    return run_verify(args)


def run_verify(args: argparse.Namespace) -> int:
    """Run :func:`verify` for parsed arguments and print the report (shared with the CLI)."""
    try:
        report = verify(
            args.name,
            args.root,
            check_images=not args.no_images,
            max_images=args.max_images,
            variant=args.variant,
            split_scheme=args.split_scheme,
        )
    except UnknownNameError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    out = report.format()
    if args.list_missing:
        out += "".join(f"\nmissing: {p}" for p in report.missing)
        out += "".join(f"\nunreadable: {p}: {r}" for p, r in report.unreadable)
    elif len(report.missing) > 0:
        out += "\n(--list-missing prints every missing file)"
    sys.stdout.write(out + "\n")
    return 0 if report.ok else 1
