"""Text towers, text embeddings and their cache, prompt templates, text tasks (issue 25, 1-3)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from embbench.metrics import evaluate_rankings
from embbench.models import (
    WeightsUnavailableError,
    check_text_capable,
    create_embedder,
    create_text_embedder,
    get_model_spec,
    open_clip_module,
    text_capable,
)
from embbench.models._text import TextUnsupportedError
from embbench.text import (
    DEFAULT_TEMPLATES,
    TemplateError,
    TextColumnError,
    average_class_embeddings,
    class_prompts,
    cross_modal_retrieval,
    embed_class_prompts,
    embed_texts,
    encode_texts,
    item_texts,
    retrieval_cis,
    text_cache,
    validate_templates,
    zero_shot_classify,
)

TEXTS = ["a red striped mug", "blue lamp", "a photo of a green chair.", "x", "shoes " * 20]


@pytest.fixture(scope="module")
def tower():
    return create_text_embedder("test_clip", weights="random")


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------ text towers


def test_text_path_equals_open_clip_encode_text(tower):
    import torch

    oc = open_clip_module()
    torch.manual_seed(0)  # the factory's RANDOM_SEED: an independent build, same weights
    clip = oc.create_model("embbench-tiny-clip", pretrained=None).eval()
    tok = oc.get_tokenizer("embbench-tiny-clip")
    with torch.no_grad():
        ref = torch.nn.functional.normalize(clip.encode_text(tok(TEXTS)), dim=-1).numpy()
    ours = encode_texts(tower, TEXTS, batch_size=2, device="cpu", progress=False)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    assert tower.context_length == 16 and tower.tokenizer_id == "embbench-tiny-clip"


def test_image_only_tasks_keep_only_the_image_tower():
    emb = create_embedder("test_clip", weights="random")
    assert emb.text is None
    assert not any(n.startswith("token_embedding") for n, _ in emb.model.named_parameters())
    both = create_embedder("test_clip", weights="random", with_text=True)
    assert both.text is not None and both.text.model.visual is both.model
    # the image tower is the same with or without the text tower
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    import torch

    np.testing.assert_array_equal(
        emb(torch.from_numpy(x)).numpy(), both(torch.from_numpy(x)).numpy()
    )


def test_text_task_on_image_only_model_is_one_line():
    assert text_capable(get_model_spec("test_clip"))
    assert text_capable(get_model_spec("marqo_ecommerce_b"))
    assert not text_capable(get_model_spec("test_vit"))
    with pytest.raises(TextUnsupportedError) as e:
        check_text_capable("test_vit", "zero-shot")
    msg = str(e.value)
    assert "\n" not in msg and "'test_vit'" in msg and "'zero-shot'" in msg and "Fix" in msg
    with pytest.raises(TextUnsupportedError):
        create_text_embedder("test_vit", weights="random")
    with pytest.raises(TextUnsupportedError):
        create_embedder("test_resnet", weights="random", with_text=True)


def test_missing_hf_tokenizer_is_one_line_before_the_model_is_built(monkeypatch):
    oc = open_clip_module()

    def no_build(*a, **k):
        raise AssertionError("the model was built before the tokenizer was checked")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(oc, "create_model", no_build)
    with pytest.raises(WeightsUnavailableError) as e:
        create_text_embedder("siglip_b16", weights="random")
    msg = str(e.value)
    assert "\n" not in msg and "'siglip_b16'" in msg and "tokenizer" in msg and "Fix" in msg


# ------------------------------------------------------------------------------------ cache


def test_text_cache_hit_is_identical_and_keys_miss_on_changes(tower, monkeypatch):
    from embbench.text import encode as enc

    first = embed_texts(tower, TEXTS, purpose="title", progress=False)
    calls = []
    real = enc.encode_texts
    monkeypatch.setattr(enc, "encode_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = embed_texts(tower, TEXTS, purpose="title", progress=False)
    assert calls == [] and again.path == first.path
    np.testing.assert_array_equal(np.asarray(again.vectors), np.asarray(first.vectors))
    assert again.ids.tolist() == [str(i) for i in range(len(TEXTS))]
    assert again.meta["identity"]["kind"] == "text"

    other = embed_texts(tower, [*TEXTS[:-1], "changed"], purpose="title", progress=False)
    assert calls == [1] and other.path != first.path
    # template set, tokenizer context length and texts are all in the key
    base = text_cache(tower, TEXTS, templates=("a photo of {}.",)).key
    assert text_cache(tower, TEXTS, templates=("an image of {}.",)).key != base
    assert text_cache(tower, TEXTS[:-1], templates=("a photo of {}.",)).key != base
    short = create_text_embedder("test_clip", weights="random", context_length=8)
    assert short.context_length == 8
    assert text_cache(short, TEXTS, templates=("a photo of {}.",)).key != base
    # class prompts: same templates hit, another template set misses
    a = embed_class_prompts(
        tower, ["mug", "lamp"], ["a photo of {}.", "{} for sale."], progress=False
    )
    n = len(calls)
    b = embed_class_prompts(
        tower, ["mug", "lamp"], ["a photo of {}.", "{} for sale."], progress=False
    )
    assert len(calls) == n
    np.testing.assert_array_equal(a, b)
    embed_class_prompts(tower, ["mug", "lamp"], ["a photo of {}."], progress=False)
    assert len(calls) == n + 1


# -------------------------------------------------------------------------------- templates


def test_template_averaging_equals_hand_computation(tower):
    classes = ["red mug", "desk lamp", "sofa"]
    templates = ["a photo of {}.", "{} for sale online.", "an e-commerce listing image of {}."]
    got = embed_class_prompts(tower, classes, templates, progress=False)
    want = []
    for c in classes:  # each prompt embedded alone, averaged by hand, re-normalised
        vecs = [
            encode_texts(tower, [t.format(c)], device="cpu", progress=False)[0] for t in templates
        ]
        mean = np.sum(np.asarray(vecs, dtype=np.float64), axis=0) / len(templates)
        want.append(mean / np.sqrt((mean**2).sum()))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-6)
    # the pure function on known numbers: classes of 2 templates
    v = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.float32)
    np.testing.assert_allclose(
        average_class_embeddings(v, 2), [[2**-0.5, 2**-0.5], [1, 0]], atol=1e-7
    )
    assert class_prompts(["a", "b"], ["x {}", "{} y"]) == ["x a", "a y", "x b", "b y"]


def test_template_validation_one_line_each():
    assert validate_templates(None) == DEFAULT_TEMPLATES
    assert 6 <= len(DEFAULT_TEMPLATES) <= 8 and validate_templates(DEFAULT_TEMPLATES)
    with pytest.raises(TemplateError, match="empty list") as e:
        validate_templates([], "params.templates")
    assert "\n" not in str(e.value) and "params.templates" in str(e.value)
    with pytest.raises(TemplateError, match=r"\[1\].*\{\}") as e:
        validate_templates(["a photo of {}.", "a product photo"], "params.templates")
    assert "\n" not in str(e.value)
    with pytest.raises(TemplateError):
        validate_templates("a photo of {}.")
    with pytest.raises(TemplateError, match="empty"):
        class_prompts(["mug", " "], ["{}"])


# ------------------------------------------------------------------------------- retrieval


def _brute_force(q, g, k):
    scores = _unit(q) @ _unit(g).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_text_to_image_equals_image_metric_code_on_same_relevance():
    rng = np.random.default_rng(3)
    g_lab = rng.integers(0, 5, size=40)
    g = rng.normal(size=(40, 16)).astype(np.float32)
    q_lab = np.array([0, 1, 2, 3, 4, 7])  # class 7 has no image: a lone query
    q = rng.normal(size=(6, 16)).astype(np.float32)
    res = cross_modal_retrieval(q, q_lab, g, g_lab, k=5)
    ref = evaluate_rankings(_brute_force(q, g, 5), q_lab, g_lab, 5, exclude_self=False)
    assert res.summary == pytest.approx(ref.summary, abs=1e-12)
    for m, v in ref.per_query.items():
        np.testing.assert_allclose(res.per_query[m], v, atol=1e-12)
    assert res.n_lone == 1 and res.n_queries == 5
    np.testing.assert_array_equal(res.topk_ids, ref.topk_ids)
    cis = retrieval_cis(res, n_boot=200)
    assert set(cis) == set(res.summary)
    for m, (lo, hi) in cis.items():
        assert lo <= res.summary[m] <= hi
    # image->text: images query the items' texts
    t_lab = rng.integers(0, 5, size=12)
    t = rng.normal(size=(12, 16)).astype(np.float32)
    back = cross_modal_retrieval(g, g_lab, t, t_lab, k=5)
    ref2 = evaluate_rankings(_brute_force(g, t, 5), g_lab, t_lab, 5, exclude_self=False)
    assert back.summary == pytest.approx(ref2.summary, abs=1e-12)


def test_item_texts_column_errors_and_empties():
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d"],
            "path": ["p"] * 4,
            "split": ["test"] * 3 + ["train"],
            "class_id": [1, 1, 2, 2],
            "title": ["red mug", "", None, "lamp"],
        }
    )
    got = item_texts(items, "title", "class_id", split="test", where="catalogue 'shop'")
    assert got.texts == ["red mug"] and got.ids.tolist() == ["a"] and got.n_empty == 2
    assert got.labels.tolist() == [1]
    with pytest.raises(TextColumnError) as e:
        item_texts(items, "name", "class_id", where="catalogue 'shop'")
    assert "\n" not in str(e.value) and "'name'" in str(e.value) and "'shop'" in str(e.value)
    items["title"] = ["", " ", None, "lamp"]
    with pytest.raises(TextColumnError, match="empty") as e:
        item_texts(items, "title", "class_id", split="test", where="catalogue 'shop'")
    assert "\n" not in str(e.value)


# -------------------------------------------------------------------------------- zero-shot


def test_zero_shot_equals_hand_computation_and_sklearn():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(7)
    classes = np.array(["mug", "lamp", "sofa", "rug", "vase", "desk", "bowl"])
    cls = rng.normal(size=(7, 12))
    y = rng.choice(classes, size=60, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    img = cls[[list(classes).index(c) for c in y]] + 3.0 * rng.normal(size=(60, 12))
    res = zero_shot_classify(img, y, cls, classes, k=5)
    pred, top5 = [], []
    for v in img:  # by hand: cosine to each class, best first
        s = [float(np.dot(v, c) / np.linalg.norm(v) / np.linalg.norm(c)) for c in cls]
        order = sorted(range(len(s)), key=lambda j: -s[j])
        pred.append(classes[order[0]])
        top5.append(list(classes[order[:5]]))
    assert res.predictions.tolist() == pred
    assert res.summary["top1"] == pytest.approx(np.mean(np.array(pred) == y))
    assert res.summary["top5"] == pytest.approx(
        np.mean([t in s for t, s in zip(y, top5, strict=True)])
    )
    assert res.summary["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert 0 < res.summary["top1"] < res.summary["top5"] < 1
    assert res.n_images == 60 and res.n_classes == 7 and res.k_used == 5
    with pytest.raises(ValueError, match="no class prompt"):
        zero_shot_classify(img, np.where(y == "mug", "cup", y), cls, classes)
    three = np.isin(y, classes[:3])  # fewer classes than k: top-5 is trivially 1, still keyed
    few = zero_shot_classify(img[three], y[three], cls[:3], classes[:3], k=5)
    assert few.summary["top5"] == 1.0 and few.k_used == 3 and few.k == 5


def test_zero_shot_with_the_tiny_clip_end_to_end(tower):
    emb = create_embedder("test_clip", weights="random", with_text=True)
    import torch

    x = torch.from_numpy(np.random.default_rng(0).normal(size=(6, 3, 64, 64)).astype(np.float32))
    img = emb(x).numpy()
    cls = embed_class_prompts(emb.text, ["mug", "lamp", "sofa"], progress=False)
    y = np.array(["mug", "lamp", "sofa"] * 2)
    res = zero_shot_classify(img, y, cls, np.array(["mug", "lamp", "sofa"]))
    with torch.no_grad():  # open_clip's own logits (logit scale does not change the ranking)
        ref = emb.text.model.encode_image(x, normalize=True) @ torch.from_numpy(cls).T
    np.testing.assert_array_equal(
        res.predictions, np.array(["mug", "lamp", "sofa"])[ref.argmax(1).numpy()]
    )


# --------------------------------------------------------------- one call per task family


def test_class_prompt_and_item_text_tasks_on_the_demo_catalogue(small_demo):
    from embbench.embed import embed_split
    from embbench.text import class_prompt_tasks, item_text_tasks

    emb = create_embedder("test_clip", weights="random", with_text=True)
    images = embed_split(emb, small_demo, "test", num_workers=0, device="cpu", progress=False)
    labels = images.labels(small_demo.items, "category")
    vecs = np.asarray(images.vectors)
    out = class_prompt_tasks(
        emb.text,
        vecs,
        labels,
        templates=["a photo of a {}."],
        dataset=small_demo.name,
        progress=False,
        device="cpu",
    )
    classes = sorted(set(labels.tolist()))
    assert out.class_labels.tolist() == classes and out.text_image.n_queries == len(classes)
    ref_cls = _unit(
        encode_texts(
            emb.text, [f"a photo of a {c}." for c in classes], progress=False, device="cpu"
        )
    )
    np.testing.assert_allclose(out.class_vectors, ref_cls, atol=1e-6)
    ref = evaluate_rankings(
        _brute_force(ref_cls, vecs, 5), out.class_labels, labels, 5, exclude_self=False
    )
    assert out.text_image.summary == pytest.approx(ref.summary, abs=1e-9)
    assert out.zero_shot.n_images == len(vecs) and set(out.zero_shot.summary) == {
        "top1",
        "top5",
        "balanced_accuracy",
    }

    items = small_demo.items.assign(title=lambda d: "a " + d["category"] + " " + d["product"])
    res = item_text_tasks(
        emb.text,
        vecs,
        labels,
        items,
        text_column="title",
        label="category",
        split="test",
        where="demo",
        dataset=small_demo.name,
        progress=False,
        device="cpu",
    )
    assert res.text_image.n_queries == len(res.texts.texts) == len(vecs)
    assert res.image_text.n_queries == len(vecs)
    with pytest.raises(TextColumnError):  # the demo has titles, but no descriptions
        item_text_tasks(
            emb.text,
            vecs,
            labels,
            small_demo.items,
            text_column="description",
            label="category",
            split="test",
            where="demo",
        )
    with pytest.raises(TemplateError):
        class_prompt_tasks(emb.text, vecs, labels, templates=[])
