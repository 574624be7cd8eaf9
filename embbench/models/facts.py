"""Model facts computed, not typed in: parameters, FLOPs, embedding and input size."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from embbench._utils import atomic_write_json, jsonable
from embbench.models._factory import create_embedder
from embbench.models._zoo import get_model_spec
from embbench.paths import cache_dir

logger = logging.getLogger(__name__)

FACTS_VERSION = 1  # bump when model_facts changes what it counts


def model_facts(name: str, weights: str = "random", *, refresh: bool = False) -> dict[str, Any]:
    """Parameters, FLOPs, embedding size and input size of a model, computed (not typed in).

    ``params_m`` counts the parameters of the image encoder (the text tower of text-image
    models excluded) in millions. FLOPs are counted with ``torch.utils.flop_counter`` on one
    image at the model's input size: convolutions and matrix multiplications, attention's
    included (one multiply-add = 2 FLOPs); element-wise ops, norms and softmax are not counted.
    ``gmacs`` = ``gflops`` / 2 is the number timm's tables (and most papers' "GFLOPs") quote:
    ViT-B/16 at 224 px gives 35.1 GFLOPs = 17.6 GMACs. Results are cached in
    ``cache_dir()/model_facts.json`` keyed by name and checked against the spec.

    Args:
        name: Model name (as for :func:`create_embedder`).
        weights: Weights to build with (do not change the counts; ``random`` needs no network).
        refresh: Recompute even when cached.

    Returns:
        ``{"params", "params_m", "gflops", "gmacs", "embed_dim", "input_size"}``.
    """
    spec = get_model_spec(name)
    identity = {
        "version": FACTS_VERSION,
        "source": spec.source,
        "identifier": spec.identifier,
        "pretrained": spec.pretrained,
        "arch": spec.arch,
        "model_kwargs": jsonable(spec.model_kwargs),
    }
    path = cache_dir() / "model_facts.json"
    cache = _read_json(path)
    hit = cache.get(spec.name)
    if not refresh and isinstance(hit, dict) and hit.get("identity") == identity:
        return {k: v for k, v in hit.items() if k != "identity"}
    emb = create_embedder(name, weights=weights)
    params = sum(p.numel() for p in emb.model.parameters())
    flops, out = _count_flops(emb.model, emb.input_size)
    facts = {
        "params": int(params),
        "params_m": round(params / 1e6, 3),
        "gflops": round(flops / 1e9, 6),
        "gmacs": round(flops / 2e9, 6),
        "embed_dim": int(out.shape[-1]),
        "input_size": list(emb.input_size),
    }
    cache = _read_json(path)  # re-read: another process may have added entries meanwhile
    cache[spec.name] = {**facts, "identity": identity}
    atomic_write_json(path, cache)
    return facts


def _count_flops(model: Any, input_size: tuple[int, int, int]) -> tuple[int, Any]:
    """FLOPs of one forward pass on one zero image, attention included.

    The fused kernels hide work from ``FlopCounterMode`` on the CPU (nn.MultiheadAttention's
    fast path skips its in/out projections; the CPU flash SDPA kernel is not counted), so the
    count runs with the MHA fast path off and the math SDPA backend, which decompose into
    counted matmuls. Parameters are frozen meanwhile (the counter's module tracker trips on
    parameters that require grad inside attention pools).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    flags = [p.requires_grad for p in model.parameters()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for p in model.parameters():
            p.requires_grad_(False)
        with (
            torch.no_grad(),
            sdpa_kernel([SDPBackend.MATH]),
            FlopCounterMode(display=False) as counter,
        ):
            out = model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return int(counter.get_total_flops()), out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("ignoring unreadable %s (%s); it will be rewritten", path, e)
        return {}
    return data if isinstance(data, dict) else {}
