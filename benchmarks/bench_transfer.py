"""Does fine-tuning pay on a small catalogue of real images? Pretrained vs A3 vs transfer.

The image set is built from npm packages (``npm pack``, the npm registry): the same emoji drawn
by three vendors, from the emoji-datasource packages (64 px PNGs) —

- ``emoji-datasource-google`` (Noto Emoji: Apache License 2.0),
- ``emoji-datasource-twitter`` (Twemoji: CC-BY 4.0),
- ``emoji-datasource-facebook`` (Facebook's emoji: the package's README says they "have no clear
  licensing"; they are downloaded by whoever runs this and never redistributed).

A class is one emoji (its unified code point sequence), with one image per vendor: retrieval
across drawing styles, i.e. the same product drawn by three photographers. Skin-tone variants
are left out. Classes are split **class-disjoint** (train / val / test classes never overlap),
as the study's Cars196 and SOP protocols do (UnED's, protocol.md: ``within`` on the test split,
each query removed from its own list); so a test query's 2 relevant images are other vendors'
drawings of an emoji no model saw in training, and test classification accuracy is undefined
(no test image has a training class). The validation classes select the epoch (val mMP@5).

Each configuration is stage 02 as a user runs it (:func:`embbench.stages.finetune`), Lite0 from
its packaged ImageNet weights; the pretrained row is stage 01 (the study's pretrained number).
Confidence intervals: 95% percentile bootstrap over the test queries; the paired bootstrap test
of each fine-tuned row against the pretrained one on the same queries.

Run: ``python benchmarks/bench_transfer.py [--train-classes 200] [--val-classes 60]
[--test-classes 150] [--epochs 5] [--train-size 112] [--test-size 128]
[--configs pretrained,A3,transfer,no_lp,linear_head,llrd_0.9,llrd_0.75,...]`` (names: CONFIGS).
Finished configurations are read back from their result records (same hash), not rerun.
Prints one table; wall times are for the machine as it is (say how busy it was when quoting
them). ``train_s / A3`` compares training times measured in separate runs, not interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

VENDORS = {  # package -> (version, licence of the images)
    "google": ("emoji-datasource-google", "16.0.0", "Apache-2.0 (Noto Emoji)"),
    "twitter": ("emoji-datasource-twitter", "16.0.0", "CC-BY-4.0 (Twemoji)"),
    "facebook": ("emoji-datasource-facebook", "16.0.0", "no clear licence (package README)"),
}

# Stage 02 settings of each configuration (layered over params/02_finetune.yaml).
CONFIGS = {
    # the study's recipe shortened as a new user would (the issue's attempt: lr 5e-3 as is)
    "A3": {"recipe": "A3", "lr": 5e-3, "lr_scaling": "none"},
    "transfer": {"recipe": "transfer"},  # params/small/02_finetune.yaml (no LLRD: measured)
    "no_lp": {"recipe": "transfer", "recipe_options": {"lp_steps": 0}},
    "linear_head": {"recipe": "transfer", "recipe_options": {"head": "linear"}},
    "no_bn_freeze": {"recipe": "transfer", "recipe_options": {"freeze_bn": False}},
    # layer-wise lr decay, and the first version of the recipe (decay 0.75) with its ablations
    "llrd_0.9": {"recipe": "transfer", "recipe_options": {"layer_decay": 0.9}},
    "llrd_0.75": {"recipe": "transfer", "recipe_options": {"layer_decay": 0.75}},
    "llrd_0.75_no_lp": {
        "recipe": "transfer",
        "recipe_options": {"layer_decay": 0.75, "lp_steps": 0},
    },
    "llrd_0.75_linear_head": {
        "recipe": "transfer",
        "recipe_options": {"layer_decay": 0.75, "head": "linear"},
    },
}


def fetch_packages(folder: Path) -> dict[str, Path]:
    """``npm pack`` each vendor's package into ``folder`` (once); vendor -> tarball."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for vendor, (pkg, version, _) in VENDORS.items():
        tgz = folder / f"{pkg}-{version}.tgz"
        if not tgz.is_file():
            subprocess.run(["npm", "pack", f"{pkg}@{version}"], cwd=folder, check=True)
        out[vendor] = tgz
    return out


def build_set(root: Path, n_train: int, n_val: int, n_test: int, seed: int) -> Path:
    """Extract the emoji every vendor draws, split the classes, write ``manifest.csv``."""
    tarballs = fetch_packages(root / "npm")
    with tarfile.open(tarballs["google"]) as tar:
        meta = json.load(tar.extractfile("package/emoji.json"))
    usable = [
        e
        for e in meta
        if all(e.get(f"has_img_{v}") for v in VENDORS) and e.get("category") != "Component"
    ]
    usable.sort(key=lambda e: e["sort_order"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(usable))
    need = n_train + n_val + n_test
    if need > len(usable):
        raise SystemExit(f"asked for {need} classes; {len(usable)} emoji have every vendor")
    split_of = {}
    for rank, i in enumerate(order[:need]):
        split_of[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    wanted = {f"package/img/{v}/64/{usable[i]['image']}": (v, i) for i in split_of for v in VENDORS}
    images = root / "images"
    for vendor, tgz in tarballs.items():
        with tarfile.open(tgz) as tar:
            for member in tar.getmembers():
                if member.name in wanted and wanted[member.name][0] == vendor:
                    dst = images / vendor / Path(member.name).name
                    if not dst.is_file():
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        dst.write_bytes(tar.extractfile(member).read())
    rows = [
        {
            "path": f"images/{v}/{usable[i]['image']}",
            "split": split_of[i],
            "emoji": usable[i]["unified"],
            "category": usable[i]["category"],
            "vendor": v,
            "name": (usable[i].get("name") or usable[i]["short_name"]).lower(),
        }
        for i in sorted(split_of)
        for v in VENDORS
    ]
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def _ci(values: np.ndarray) -> str:
    from embbench.bootstrap import bootstrap_ci

    lo, hi = bootstrap_ci(values, n_boot=2000, seed=0)
    return f"{values.mean():.3f} [{lo:.3f}, {hi:.3f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="data/emoji_vendors", help="where the set is built")
    p.add_argument("--train-classes", type=int, default=200)
    p.add_argument("--val-classes", type=int, default=60)
    p.add_argument("--test-classes", type=int, default=150)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-size", type=int, default=112)
    p.add_argument("--test-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default="pretrained,A3,transfer,no_lp,linear_head,llrd_0.9")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    os.environ.setdefault("EMBBENCH_RUNS", str(root / "runs"))

    import embbench
    from embbench.bootstrap import paired_bootstrap_test
    from embbench.cells import run_grid
    from embbench.records import ResultStore
    from embbench.stages.embed import EmbedConfig, EmbedSteps
    from embbench.stages.finetune import FinetuneConfig, FinetuneSteps

    embbench.setup_logging()
    manifest = build_set(root, args.train_classes, args.val_classes, args.test_classes, args.seed)
    items = pd.read_csv(manifest)
    counts = items.groupby("split")["emoji"].nunique().to_dict()
    sys.stdout.write(f"set: {manifest} ({len(items)} images, classes per split {counts})\n")
    common = {
        "models": ["efficientnet_lite0"],
        "weights": "pretrained",
        "datasets": ["emoji_vendors"],
        "data_root": {"emoji_vendors": str(manifest)},
        "data_options": {"emoji_vendors": {"label_columns": ["emoji", "category"]}},
        "label": "emoji",
        "protocol": "within",
        "backend": "exact",
        "seed": args.seed,
    }
    store = ResultStore()
    rows, per_query = [], {}
    for name in args.configs.split(","):
        t0 = time.perf_counter()
        if name == "pretrained":
            cfg = EmbedConfig.from_files("params/01_embed.yaml", **common, tasks=["image-image"])
            (record,) = run_grid(cfg, EmbedSteps(cfg), store=store)
        else:
            cfg = FinetuneConfig.from_files(
                "params/02_finetune.yaml",
                "params/small/02_finetune.yaml",
                **common,
                **CONFIGS[name],
                epochs=args.epochs,
                train_size=args.train_size,
                test_size=args.test_size,
                batch_size=args.batch,
                register_mlflow=False,
            )
            (record,) = run_grid(cfg, FinetuneSteps(cfg), store=store)
        wall = time.perf_counter() - t0
        pq = store.per_query(record)
        per_query[name] = pq
        sel = record.details.get("selection") or {}
        rows.append(
            {
                "config": name,
                "mMP@5 [95% CI]": _ci(pq["mMP@5"]),
                "mR@1 [95% CI]": _ci(pq["mR@1"]),
                "n_queries": record.n_queries,
                "selected_epoch": sel.get("epoch", ""),
                "train_s": round(record.timings.train_s or 0.0, 1),
                "wall_s (this run)": round(wall, 1),
            }
        )
    table = pd.DataFrame(rows)
    if "A3" in set(table["config"]):  # training time against the study's recipe, same budget
        a3 = float(table.loc[table["config"] == "A3", "train_s"].iloc[0]) or float("nan")
        table["train_s / A3"] = [f"{t / a3:.2f}" if t else "" for t in table["train_s"]]
    if "pretrained" in per_query:
        base = per_query["pretrained"]
        for metric in ("mMP@5", "mR@1"):
            diffs = []
            for name in table["config"]:
                if name == "pretrained":
                    diffs.append("")
                    continue
                t = paired_bootstrap_test(per_query[name][metric], base[metric], n_boot=2000)
                diffs.append(f"{t['diff']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}]")
            table[f"d{metric} vs pretrained"] = diffs
    sys.stdout.write(table.to_string(index=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
