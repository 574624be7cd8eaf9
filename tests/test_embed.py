"""Embedding extraction: batching, bad images, shards, resume, cache reuse."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision import transforms

from embbench import embed as embed_mod
from embbench.catalogue import Catalogue
from embbench.embed import embed_split, embedding_cache, resolve_precision


@dataclass
class _Spec:
    name: str = "tiny"
    family: str = "supervised"
    backbone: str = "convolutional"
    paper_name: str = "tiny"


@dataclass
class TinyEmbedder:
    """A real (tiny) conv net with its own preprocessing; stands in for the registry's models."""

    model: torch.nn.Module = field(
        default_factory=lambda: torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
    )
    transform: object = field(
        default_factory=lambda: transforms.Compose(
            [transforms.Resize((32, 32)), transforms.ToTensor()]
        )
    )
    spec: _Spec = field(default_factory=_Spec)
    weights_used: dict = field(default_factory=lambda: {"kind": "random", "seed": 0})
    embed_dim: int = 8

    def cache_identity(self) -> dict:
        return {"model": "tiny", "weights": self.weights_used, "preprocessing": "resize32"}


@pytest.fixture
def catalogue_with_bad_files(small_demo, tmp_path):
    test = small_demo.split("test").copy()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = test["path"].iloc[0]
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(Path(good).read_bytes()[:200])
    extra = pd.DataFrame(
        {
            "item_id": ["bad-empty", "bad-text", "bad-trunc"],
            "path": [str(tmp_path / "empty.jpg"), str(tmp_path / "text.jpg"), str(trunc)],
            "split": "test",
            "product": "x",
            "category": "y",
        }
    )
    items = pd.concat([test.iloc[:5], extra, test.iloc[5:]], ignore_index=True)
    return Catalogue("demo", items, ("product", "category"), "product", root="t")


def test_bad_images_are_skipped_and_listed(catalogue_with_bad_files):
    torch.manual_seed(0)
    emb = TinyEmbedder()
    es = embed_split(
        emb,
        catalogue_with_bad_files,
        "test",
        batch_size=4,
        num_workers=0,
        shard_size=5,
        progress=False,
    )
    n_total = len(catalogue_with_bad_files.items)
    assert es.vectors.shape == (n_total - 3, 8)
    assert sorted(f["item_id"] for f in es.failed) == ["bad-empty", "bad-text", "bad-trunc"]
    assert all(f["reason"] for f in es.failed)
    assert "bad-text" not in set(es.item_ids)
    # vectors equal a direct forward pass on the same preprocessing
    from embbench.images import load_rgb

    row = catalogue_with_bad_files.items.iloc[0]
    with torch.inference_mode():
        ref = emb.model(emb.transform(load_rgb(row["path"]))[None])[0].numpy()
    assert np.allclose(es.vectors[list(es.item_ids).index(row["item_id"])], ref, atol=1e-5)


def test_killed_run_resumes_from_finished_shards(small_demo, monkeypatch):
    torch.manual_seed(0)
    emb = TinyEmbedder()
    cache = embedding_cache(emb, small_demo, "test")
    calls = {"n": 0}
    real_write = cache.__class__.write_shard

    def dying_write(self, index, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_write(self, index, *a, **k)

    monkeypatch.setattr(cache.__class__, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        embed_split(
            emb, small_demo, "test", batch_size=2, num_workers=0, shard_size=4, progress=False
        )
    assert cache.shard_done(0) and not cache.shard_done(1)
    monkeypatch.setattr(cache.__class__, "write_shard", real_write)
    seen = []
    orig_forward = emb.model.forward

    def counting_forward(x):
        seen.append(len(x))
        return orig_forward(x)

    emb.model.forward = counting_forward
    es = embed_split(
        emb, small_demo, "test", batch_size=2, num_workers=0, shard_size=4, progress=False
    )
    n = len(small_demo.split("test"))
    assert sum(seen) == n - 4  # the finished shard was not recomputed
    assert es.vectors.shape[0] == n
    assert list(es.item_ids) == small_demo.split("test")["item_id"].tolist()
    # a complete cache is reused without any forward pass
    seen.clear()
    embed_split(emb, small_demo, "test", batch_size=2, num_workers=0, shard_size=4, progress=False)
    assert seen == []


def test_workers_give_same_vectors(small_demo):
    torch.manual_seed(0)
    emb = TinyEmbedder()
    a = embed_split(
        emb, small_demo, "val", batch_size=3, num_workers=0, progress=False, overwrite=True
    )
    va = np.array(a.vectors)
    b = embed_split(
        emb, small_demo, "val", batch_size=5, num_workers=2, progress=False, overwrite=True
    )
    assert np.allclose(va, b.vectors, atol=1e-5)


def test_precision_resolution():
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="precision='half'"):
        resolve_precision("half", torch.device("cpu"))
    assert embed_mod.resolve_device("cpu").type == "cpu"


def test_cpu_channels_last_vectors_equal_the_nchw_path(small_demo):
    """A conv net embeds in channels_last on the CPU; its vectors match plain NCHW's.

    Tolerance: max abs difference 1e-4 on vectors of norm ~1-30, cosine >= 0.99999 (measured
    on EfficientNet-Lite0's 1280-d vectors: 7e-6 and 0.9999998).
    """
    import copy

    from embbench._torch_utils import channels_last_for
    from embbench.images import load_rgb
    from embbench.models import create_embedder

    torch.manual_seed(0)
    emb = create_embedder("test_resnet", weights="random")
    reference = copy.deepcopy(emb.model).eval()  # embed_split converts emb.model in place
    assert channels_last_for(emb.model, torch.device("cpu"))
    vit_like = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 16, 16), torch.nn.Flatten())
    assert not channels_last_for(vit_like, torch.device("cpu"))  # a patch embedding alone
    got = embed_split(
        emb, small_demo, "val", batch_size=4, num_workers=0, progress=False, overwrite=True
    )
    conv = next(m for m in emb.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    rows = small_demo.split("val")
    x = torch.stack([emb.transform(load_rgb(p)) for p in rows["path"]])
    with torch.inference_mode():
        want = reference(x).float().numpy()
    order = [list(got.item_ids.astype(str)).index(i) for i in rows["item_id"].astype(str)]
    vec = np.asarray(got.vectors)[order]
    assert np.abs(vec - want).max() <= 1e-4
    cos = (vec * want).sum(1) / np.linalg.norm(vec, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999
