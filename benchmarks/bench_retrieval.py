"""Retrieval benchmark: exact backend, faiss, Milvus Lite and the bare matrix product, timed alike.

On seeded, L2-normalised vectors with class structure and 1% exact duplicates (by default 20k
and then SOP test scale, 60k, x 768; queries = index, protocol ``within``, k = 5) it measures:

* the **floor**: the bare float32 matrix product ``queries @ index.T`` in the exact backend's
  blocks, with numpy (OpenBLAS) and with torch (MKL), one multi-threaded BLAS call per block; and
  ``bare_blocks``, the exact backend's own products (same library, dtype, layout and call, one
  single-threaded BLAS call per block, blocks on ``--threads`` worker threads) with no
  selection: no top-k, no ties, nothing else;
* the exact backend (``embbench.retrieval.ExactBackend``, its product path chosen by the machine's
  cached measurement) as a user gets it (``exact``: ``select="auto"``, which in a new process
  keeps the numpy selection until the process has searched ``JIT_MIN_SCORES`` scores) and with
  its compiled selection (``exact_numba``: ``select="numba"``; the seconds numba took to load in
  the fresh process, before the warm-up, are printed as ``load_s``), faiss ``IndexFlatIP`` (k + 1,
  own id dropped), Milvus Lite (FLAT, IP; build reported apart) and the metrics from rankings
  (ours vs torchmetrics);

and prints each search's ratio to the bare products and to faiss, then exact / fastest bare
product for both selections (target: <= 1.05), from the medians and as the median of the
per-round ratios, and whether both gave the same ids and distances.

**Where the exact search's time goes** (``parts``, printed after the rounds): one block of the
exact backend on one thread, each part timed in thread CPU time (so other processes' load
hardly moves it), best of ``--repeats`` (at least 5): the block's product, reading its scores
once for the group maxima, the rest of the exact top-k, the whole top-k compiled (numba), and
canonical re-scoring with ranking (and widening), each as a share of the product. On another
CPU (e.g. Intel) these shares say which part costs there: the product itself, memory bandwidth
(the maxima) or the small steps.

**Every library is timed the same way:** each run is a fresh process (``--rounds`` of them per
library, interleaved so load changes hit all alike) that loads the data, warms up on one block of
queries, then times the full search ``--repeats`` times and keeps the best; the median over rounds
is reported. The same thread count is given to every library (OMP/MKL/OPENBLAS_NUM_THREADS,
``torch.set_num_threads``, threadpoolctl, ``faiss.omp_set_num_threads``). **Peak memory** is the
rise of the child's own high-water mark over the search: the child resets it (``echo 5 >
/proc/self/clear_refs``) after loading the data and reads ``VmHWM`` afterwards; ``ru_maxrss``
would include what the parent had allocated before forking.

**Why faiss can look slow on new CPUs:** faiss-cpu's wheel bundles its own OpenBLAS (0.3.15),
which does not recognise recent CPUs (e.g. AMD Zen 5) and, unless ``OPENBLAS_CORETYPE`` is set,
falls back to old generic kernels (~110 GFLOP/s where numpy's OpenBLAS 0.3.31 reaches ~480). The
benchmark prints the BLAS libraries and kernels each child used (threadpoolctl), torch's BLAS
(``torch.__config__.show()``: MKL version, CPU capability) and the ``OPENBLAS_*`` environment
(``OPENBLAS_CORETYPE``, set or not), so a ratio can be read against what really ran. It never
changes ``OPENBLAS_*`` itself: to try another kernel set, set it on the command line, e.g.
``OPENBLAS_CORETYPE=Haswell python benchmarks/bench_retrieval.py``.

Usage::

    python benchmarks/bench_retrieval.py                    # 20k, then 60k x 768 (~25 min)
    python benchmarks/bench_retrieval.py --n 20000 --skip milvus   # 20k x 768, ~2 min
    python benchmarks/bench_retrieval.py --quick            # seconds: smoke test of the script
    python benchmarks/bench_retrieval.py --milvus-scaling 10000 40000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBS = ("bare_numpy", "bare_torch", "bare_blocks", "exact", "exact_numba", "faiss", "milvus")
EXACT = ("exact", "exact_numba")
BARE = ("bare_numpy", "bare_torch", "bare_blocks")
FAISS_NOTE = (
    "note: faiss-cpu bundles OpenBLAS 0.3.15, which does not know recent CPUs (e.g. AMD Zen 5) and "
    "falls back to old kernels unless OPENBLAS_CORETYPE is set; compare its kernels above."
)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[20_000, 60_000],
                   help="vectors (queries = index); several sizes run in turn")  # fmt: skip
    p.add_argument("--dim", type=int, default=768, help="vector dimension")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="threads for every library")
    p.add_argument("--noise", type=float, default=2.5, help="within-class noise scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per library")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per process (best kept)")
    p.add_argument("--skip", nargs="*", default=[], choices=LIBS, help="libraries to leave out")
    p.add_argument("--quick", action="store_true", help="2k x 128, one round, no Milvus")
    p.add_argument(
        "--milvus-scaling",
        nargs="*",
        type=int,
        metavar="N",
        help="instead: Milvus Lite search s per 1k queries against these index sizes",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.rounds, args.repeats = [2000], 128, 1, 2
        args.skip = sorted(set(args.skip) | {"milvus"})
    return args


# ---------------------------------------------------------------------------------------------
# Child side: one library, one fresh process
# ---------------------------------------------------------------------------------------------


def _status_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _blas_info() -> list[str]:
    """The BLAS libraries loaded here (threadpoolctl: version, kernels) and torch's own BLAS."""
    import torch
    from threadpoolctl import threadpool_info

    out = [
        f"{i['internal_api']} {i.get('version')} kernels={i.get('architecture', '?')} "
        f"threads={i['num_threads']} ({Path(i['filepath']).name})"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    ]
    show = torch.__config__.show()
    keys = ("BLAS_INFO", "LAPACK_INFO", "USE_MKL", "USE_OPENMP")
    flags = [f for f in show.replace(",", " ").split() if f.startswith(keys)]
    mkl = [line.strip() for line in show.splitlines() if "Math Kernel Library" in line]
    cpu = [line.strip() for line in show.splitlines() if "CPU capability" in line]
    out.append(f"torch {torch.__version__} BLAS: {' '.join(flags)}; {'; '.join(mkl + cpu)}")
    return out


def _searcher(lib: str, x, k: int, threads: int, data: Path):
    """A function running the full search (returns ids, dists or None) and its extra facts."""
    import numpy as np

    n = len(x)
    qids = np.arange(n)
    extra: dict[str, object] = {}
    if lib in ("bare_numpy", "bare_torch"):
        from embbench.retrieval import ExactBackend
        from embbench.retrieval._matmul import matmul_into

        path = lib.removeprefix("bare_")
        block = min(n, ExactBackend().rows_per_block(n))
        buf = np.empty((block, n), dtype=np.float32)
        extra["block"] = block

        def run(q=x):
            for s in range(0, len(q), block):
                e = min(len(q), s + block)
                matmul_into(path, q[s:e], x, buf[: e - s])  # the same product, nothing else

        return run, extra
    if lib == "bare_blocks":
        from embbench.retrieval import ExactBackend
        from embbench.retrieval._matmul import (
            block_scores,
            choose_matmul,
            run_blocks,
            score_buffer,
            search_workers,
        )

        block = min(n, ExactBackend().rows_per_block(n))
        path = choose_matmul(x.shape[1], threads, 2.0 * n * n * x.shape[1])
        workers = search_workers(threads)
        extra.update(block=block, matmul=path)

        def run(q=x):  # the exact backend's products (same calls, blocks, threads), no selection
            bufs: queue.SimpleQueue = queue.SimpleQueue()  # fresh per search, as in the backend
            for _ in range(workers):
                bufs.put(score_buffer(block, n))

            def one(start: int) -> None:
                buf = bufs.get()
                block_scores(path, q[start : start + block], x, buf)
                bufs.put(buf)

            run_blocks(one, range(0, len(q), block), workers)

        return run, extra
    if lib in EXACT:
        from embbench.retrieval import ExactBackend
        from embbench.retrieval._matmul import _load_jit

        if lib == "exact_numba":  # what a new process pays once (import, cached kernel)
            extra["load_s"] = _load_jit()
        be = ExactBackend(threads=threads, select="numba" if lib == "exact_numba" else "auto")

        def run(q=x):
            out = be.search(x, q, k, query_ids=qids[: len(q)])
            extra.update(
                matmul=be.last_matmul,
                select=be.last_select,
                block=min(n, be.rows_per_block(n)),
                widened=be.n_widened,
            )
            return out

        return run, extra
    if lib == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)

        def run(q=x):
            sims, raw = index.search(q, k + 1)
            own = raw == qids[: len(q), None]  # drop the query by id (faiss has no tie rule)
            own[~own.any(axis=1), -1] = True
            return raw[~own].reshape(len(q), k), 2 - 2 * sims[~own].reshape(len(q), k)

        return run, extra
    if lib == "milvus":
        from embbench.retrieval import MilvusBackend

        be = MilvusBackend(uri=str(data / "milvus.db"), collection_prefix="bench")
        t0 = time.perf_counter()
        be.ensure_collection(x)
        extra["build_s"] = time.perf_counter() - t0

        def run(q=x):
            return be.search(x, q, k, query_ids=qids[: len(q)])

        return run, extra
    raise ValueError(lib)


def _worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    data = Path(args.data)
    lib = args.worker
    if lib.startswith("metrics_"):
        print("RESULT " + json.dumps(_metrics_worker(lib, data, args)), flush=True)
        return
    if lib == "parts":
        print("RESULT " + json.dumps(_parts_worker(data, args)), flush=True)
        return
    queries = np.load(data / "x.npy")
    index = np.load(data / "index.npy") if (data / "index.npy").exists() else queries
    lib = lib.removeprefix("scale_")  # --milvus-scaling: 1k queries, a bigger index
    run, extra = _searcher(lib, index, args.k, args.threads, data)
    run(index[: min(len(index), 256)])  # warm-up: thread pools, libraries, packing buffers
    rss0 = _status_kb("VmRSS")
    reset = _reset_peak()
    times, out = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = run(queries)
        times.append(time.perf_counter() - t0)
    peak = _status_kb("VmHWM")
    result = {
        "search_s": min(times),
        "times": times,
        "peak_rise_mb": (peak - rss0) / 1024 if reset else float("nan"),
        "blas": _blas_info(),
        **extra,
    }
    if out is not None and not args.worker.startswith("scale_"):
        np.save(data / f"ids_{lib}.npy", out[0])
        np.save(data / f"dists_{lib}.npy", out[1])
    print("RESULT " + json.dumps(result), flush=True)


def _parts_worker(data: Path, args: argparse.Namespace) -> dict[str, object]:
    """Where one block of the exact search spends its time, on one thread (thread CPU time)."""
    import numpy as np

    from embbench.retrieval import ExactBackend
    from embbench.retrieval._matmul import (
        _jit,
        block_scores,
        choose_matmul,
        group_maxima,
        jit_applies,
        score_buffer,
        single_threaded_libraries,
        top_candidates,
    )
    from embbench.retrieval.base import check_search_args

    jit_top = _jit().top_candidates  # loaded (and compiled if need be) before any timing

    x = np.load(data / "x.npy")
    n, qids = len(x), np.arange(len(x))
    be = ExactBackend(threads=1)
    block = min(n, be.rows_per_block(n))
    q = x[:block]
    path = choose_matmul(x.shape[1], args.threads, 2.0 * n * n * x.shape[1])
    _, _, _, tol = check_search_args(x, x, args.k, qids)
    kk = args.k + 1
    c = min(n, kk + be.margin)
    buf = score_buffer(block, n)
    best: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.thread_time()
        out = fn()
        best[name] = min(best.get(name, float("inf")), time.thread_time() - t0)
        return out

    with single_threaded_libraries():
        for _ in range(max(5, args.repeats) + 1):  # the first round warms up
            scores = timed("product", lambda: block_scores(path, q, x, buf))
            timed("group maxima", lambda s=scores: group_maxima(s))
            timed("selection", lambda s=scores: top_candidates(s, c))
            if jit_applies(n, c):
                scores = block_scores(path, q, x, buf)  # as cold as the search leaves it
                timed("compiled selection", lambda s=scores: jit_top(s, c))
            vals, cand = top_candidates(scores, c)

            def rank(s=scores, v=vals, cd=cand):
                return be._rank(s, q, x, v, cd, kk, tol, 0, qids)

            timed("re-scoring + ranking", rank)
    best["rest of selection"] = best.pop("selection") - best["group maxima"]
    return {"block": block, "matmul": path, "ms": {k: v * 1e3 for k, v in best.items()}}


def _metrics_worker(lib: str, data: Path, args: argparse.Namespace) -> dict[str, float]:
    """Time ours or torchmetrics the same way (warm-up, best of repeats); compare values."""
    import numpy as np

    from embbench.metrics import evaluate_rankings

    ids, labels = np.load(data / "ids_exact.npy"), np.load(data / "labels.npy")
    n, k = len(ids), args.k

    def ours():
        return evaluate_rankings(ids, labels, labels, k, exclude_self=True, query_ids=np.arange(n))

    res = ours()
    if lib == "metrics_ours":
        fn = ours
    else:
        fn, check = _torchmetrics_fn(ids, labels, res, k)
    fn()  # warm-up
    best = float("inf")
    for _ in range(max(2, args.repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    out = {"s": best, **{name: float(v) for name, v in res.summary.items()}}
    out.update(n_queries=res.n_queries, n_lone=res.n_lone)
    if lib == "metrics_torchmetrics":
        out.update(check())
    return out


def _torchmetrics_fn(ids, labels, res, k):
    """torchmetrics P/NDCG/MRR on the same rankings, and a check of the values against ours.

    Each query gets its k results (scores k..1) plus ``min(n_q, k) - hits`` relevant "phantom"
    items scored below them, so torchmetrics' ideal DCG sees the same relevant count as the
    protocol (n_q is not visible to torchmetrics otherwise).
    """
    import numpy as np
    import torch
    from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalPrecision

    q = res.query_index
    rel = labels[ids[q]] == labels[q][:, None]
    n_rel = np.bincount(labels)[labels[q]] - 1
    phantoms = np.minimum(n_rel, k) - rel.sum(axis=1)
    nq = len(q)
    preds = torch.from_numpy(np.concatenate([
        np.tile(np.arange(k, 0, -1, dtype=np.float32), nq),
        np.full(phantoms.sum(), 0.5, dtype=np.float32),
    ]))  # fmt: skip
    target = torch.from_numpy(np.concatenate([rel.reshape(-1), np.ones(phantoms.sum(), bool)]))
    indexes = torch.from_numpy(
        np.concatenate([np.repeat(np.arange(nq), k), np.repeat(np.arange(nq), phantoms)])
    )
    metrics = {
        "P": RetrievalPrecision(top_k=k, empty_target_action="skip"),
        "NDCG": RetrievalNormalizedDCG(top_k=k, empty_target_action="skip"),
        "MRR": RetrievalMRR(top_k=k, empty_target_action="skip"),
    }

    def fn():
        return {name: float(m(preds, target, indexes=indexes)) for name, m in metrics.items()}

    def check():
        tm = fn()
        full = n_rel >= k  # Precision@k = MP@k only where n_q >= k
        keep = torch.from_numpy(full[indexes.numpy()])
        p_sub = float(metrics["P"](preds[keep], target[keep], indexes=indexes[keep]))
        return {
            "ndcg_diff": abs(tm["NDCG"] - res.summary[f"NDCG@{k}"]),
            "mrr_diff": abs(tm["MRR"] - res.summary[f"MRR@{k}"]),
            "mp_diff": abs(p_sub - float(res.per_query[f"mMP@{k}"][full].mean())),
        }

    return fn, check


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------


def _run_child(lib: str, data: Path, args: argparse.Namespace, n: int | None = None) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", lib, "--data", str(data), "--k", str(args.k),
        "--threads", str(args.threads), "--repeats", str(args.repeats),
    ]  # fmt: skip
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{lib} worker failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


def _make_data(n: int, dim: int, noise: float, seed: int, data: Path):
    """Seeded unit vectors: classes of 2-8 items (SOP-like) around random centres, 1% duplicates."""
    import numpy as np

    from embbench.retrieval import l2_normalize

    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 9, n)
    labels = np.repeat(np.arange(n), sizes)[:n]
    rng.shuffle(labels)
    centres = rng.standard_normal((int(labels.max()) + 1, dim), dtype=np.float32)
    x = centres[labels] + noise * rng.standard_normal((n, dim), dtype=np.float32)
    dup_src, dup_dst = rng.integers(0, n, (2, n // 100))
    x[dup_dst] = x[dup_src]
    labels[dup_dst] = labels[dup_src]
    x = l2_normalize(x)
    np.save(data / "x.npy", x)
    np.save(data / "labels.npy", labels)
    return x, labels


def _environment(args: argparse.Namespace, describe_data: bool = True) -> None:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    cores = len(os.sched_getaffinity(0))
    blas_env = {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")}
    print(f"machine: {cpu}, {cores} usable cores, load average {os.getloadavg()}")
    print(f"OPENBLAS_* environment: {blas_env or 'none set'} "
          f"(OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})")  # fmt: skip
    if not describe_data:
        return
    print(
        f"data: {args.n} x {args.dim} unit vectors, queries = index, k={args.k}, "
        f"threads={args.threads}, rounds={args.rounds} interleaved fresh processes per library, "
        f"each the best of {args.repeats} timed searches; figures are medians over rounds"
    )


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.worker:
        _worker(args)
        return
    if args.milvus_scaling is not None:
        _milvus_scaling(args)
        return
    ratios = {}
    for n in args.n:
        ratios[n] = _one_size(argparse.Namespace(**{**vars(args), "n": n}))
    print(
        "\ntargets: exact / fastest bare product: "
        + "; ".join(
            f"{n} x {args.dim}: " + ", ".join(f"{ex} {r:.2f}" for ex, r in rs.items())
            for n, rs in ratios.items()
        )
        + "  (target <= 1.05)"
    )


def _one_size(args: argparse.Namespace) -> dict[str, float]:
    """The whole comparison at ``args.n`` vectors; returns each exact / fastest bare product."""
    import numpy as np

    print(f"\n===== {args.n} x {args.dim} =====")
    _environment(args)
    libs = [lib for lib in LIBS if lib not in args.skip]
    if "faiss" in libs:
        try:
            import faiss  # noqa: F401 - only to see whether it is installed
        except ImportError:
            print("faiss is not installed (pip install faiss-cpu): left out")
            libs.remove("faiss")
    with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as tmp:
        data = Path(tmp)
        _, labels = _make_data(args.n, args.dim, args.noise, args.seed, data)
        rounds: list[dict[str, dict]] = []
        for r in range(max(1, args.rounds)):  # interleaved: a load change hits every library
            rounds.append({lib: _run_child(lib, data, args) for lib in libs})
            print(
                f"round {r + 1}: "
                + ", ".join(f"{lib} {run['search_s']:.2f} s" for lib, run in rounds[-1].items())
                + f"  (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
        runs = {lib: dict(rounds[-1][lib]) for lib in libs}
        for lib in libs:  # the median over rounds of each child's best-of-repeats
            runs[lib]["search_s"] = statistics.median(rnd[lib]["search_s"] for rnd in rounds)
        bare = [b for b in BARE if b in libs]
        for ex in (e for e in EXACT if e in libs and bare):
            paired = [rnd[ex]["search_s"] / min(rnd[b]["search_s"] for b in bare)
                      for rnd in rounds]  # fmt: skip
            runs[ex]["paired"] = statistics.median(paired)
            print(
                f"per-round {ex} / fastest bare product: " + ", ".join(f"{p:.3f}" for p in paired)
            )
        if "exact" in libs:
            runs["exact"]["parts"] = _run_child("parts", data, args)
        ids = {lib: np.load(data / f"ids_{lib}.npy") for lib in libs if "bare" not in lib}
        dists = {lib: np.load(data / f"dists_{lib}.npy") for lib in libs if "bare" not in lib}
        met = {m: _run_child(f"metrics_{m}", data, args) for m in ("ours", "torchmetrics")}
    return _report(args, runs, ids, dists, met)


def _report(args, runs, ids, dists, met) -> dict[str, float]:
    import numpy as np

    print("\nBLAS libraries and kernels seen by each child (threadpoolctl):")
    seen: dict[str, list[str]] = {}
    for lib, run in runs.items():
        for entry in run["blas"]:
            seen.setdefault(entry, []).append(lib)
    for entry, libs in seen.items():
        print(f"  {entry}  <- {', '.join(libs)}")
    print(f"  the exact backend's product path here: {runs['exact'].get('matmul')}")
    print(f"\n{'library':12s} {'median s':>9s} {'peak rise MB':>13s}  notes")
    for lib, run in runs.items():
        notes = ", ".join(
            f"{key} {run[key]:.1f}" if isinstance(run[key], float) else f"{key} {run[key]}"
            for key in ("block", "matmul", "select", "widened", "build_s", "load_s")
            if key in run
        )
        print(f"{lib:12s} {run['search_s']:9.3f} {run['peak_rise_mb']:13.1f}  {notes}")
    print()
    bases = [b for b in (*BARE, "faiss") if b in runs]
    fastest = min((runs[b]["search_s"], b) for b in bases if b in BARE)
    for lib in (*EXACT, "faiss", "milvus"):
        if lib not in runs:
            continue
        parts = [
            f"{runs[lib]['search_s'] / runs[b]['search_s']:.2f} x {b}" for b in bases if b != lib
        ]
        print(f"ratio {lib} / baseline: " + ", ".join(parts))
    ratios = {}
    for ex in (e for e in EXACT if e in runs):
        ratios[ex] = runs[ex]["search_s"] / fastest[0]
        print(
            f"ratio {ex} / fastest bare product ({fastest[1]}), medians: {ratios[ex]:.3f}; median "
            f"of per-round ratios: {runs[ex].get('paired', float('nan')):.3f}  (target <= 1.05)"
        )
    if "exact" in ids and "exact_numba" in ids:
        same = np.array_equal(ids["exact"], ids["exact_numba"]) and np.array_equal(
            dists["exact"], dists["exact_numba"]
        )
        print(f"exact ({runs['exact'].get('select')} selection) and exact_numba: "
              f"{'identical' if same else 'DIFFERENT'} ids and distances")  # fmt: skip
    if "parts" in runs["exact"]:
        p = runs["exact"]["parts"]
        ms = p["ms"]
        print(
            f"where exact's time goes, one block of {p['block']} queries on one thread "
            f"({p['matmul']}, thread CPU time, best of {max(5, args.repeats)}): product "
            f"{ms['product']:.1f} ms; "
            + "; ".join(
                f"{part} {ms[part]:.1f} ms ({100 * ms[part] / ms['product']:.1f}%)"
                for part in (
                    "group maxima",
                    "rest of selection",
                    "compiled selection",
                    "re-scoring + ranking",
                )
                if part in ms
            )
        )
    if "faiss" in runs:
        print(FAISS_NOTE)
    print(
        f"ratio torchmetrics / ours (metrics from rankings, both warm, best of "
        f"{max(2, args.repeats)}): {met['torchmetrics']['s'] / met['ours']['s']:.1f}"
    )
    tm = met["torchmetrics"]
    print(
        f"metric values vs torchmetrics: |NDCG diff| {tm['ndcg_diff']:.1e}, |MRR diff| "
        f"{tm['mrr_diff']:.1e}, |mMP - precision| on n_q >= k {tm['mp_diff']:.1e}"
    )
    for lib in ("faiss", "milvus"):
        if lib in ids:
            same = float((ids["exact"] == ids[lib]).all(axis=1).mean())
            gap = float(np.abs(np.sort(dists["exact"], 1) - np.sort(dists[lib], 1)).max())
            print(
                f"exact vs {lib}: identical top-{args.k} lists {same:.4f}, max |distance| "
                f"difference at equal rank {gap:.1e} (faiss has no tie rule)"
            )
    ours = met["ours"]
    print(
        "summary: "
        + ", ".join(f"{m} {ours[m]:.4f}" for m in ("mMP@5", "mR@1", "MAP@5") if m in ours)
        + f"; queries {ours['n_queries']}, lone {ours['n_lone']}; load average {os.getloadavg()}"
    )
    return ratios


def _milvus_scaling(args: argparse.Namespace) -> None:
    """Milvus Lite vs the exact backend: search seconds per 1,000 queries against index size."""
    import numpy as np

    args.repeats = max(1, args.repeats)
    _environment(args, describe_data=False)
    print(
        f"1,000 queries (index rows, protocol within) x {args.dim}-d index, k={args.k}, "
        f"threads={args.threads}, best of {args.repeats} after a warm-up, fresh processes"
    )
    print(f"\n{'index rows':>10s} {'lite build s':>13s} {'lite s/1k q':>12s} {'exact s/1k q':>13s}")
    for n in args.milvus_scaling:
        with tempfile.TemporaryDirectory(prefix="bench_milvus_") as tmp:
            data = Path(tmp)
            x, _ = _make_data(n, args.dim, args.noise, args.seed, data)
            np.save(data / "x.npy", x[: min(n, 1000)])  # the children search 1k queries ...
            np.save(data / "index.npy", x)  # ... against the whole index
            lite = _run_child("scale_milvus", data, args)
            exact = _run_child("scale_exact", data, args)
        print(f"{n:10d} {lite['build_s']:13.1f} {lite['search_s']:12.2f} {exact['search_s']:13.2f}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
