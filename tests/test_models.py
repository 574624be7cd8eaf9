"""The model zoo registry and the embedder factory (offline: tiny models, random weights)."""

from __future__ import annotations

import hashlib
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from embbench import models
from embbench._registry import UnknownNameError
from embbench.models import (
    CheckpointError,
    ModelError,
    ModelSpec,
    WeightsUnavailableError,
    create_embedder,
    get_model_spec,
    list_models,
    model_facts,
)
from embbench.paths import cache_dir

TINY = ["test_vit", "test_resnet", "test_clip"]

# Every model the paper names (its figures' labels), so none can silently drop out of the zoo.
PAPER_LABELS = {
    "ViT-Base-Patch16",
    "ViT-Large-Patch32",
    "ConvNeXt-Base",
    "ResNet50",
    "EfficientNetV2",
    "Swin Transformer",
    "DINO-ViT-Base",
    "DINO-ResNet50",
    "DINOv2-ViT-Base",
    "MAE-ViT-Base",
    "MAWS-ViT-Base",
    "OpenAI CLIP RN50",
    "OpenAI CLIP ViT-B/16",
    "MetaCLIP ViT-B/16",
    "EVA-CLIP",
    "Apple CLIP",
    "SigLIP",
    "Marqo-B",
}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network and empty weight caches, so 'pretrained' must fail however this host is set."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch_hub"))
    yield
    torch.hub.set_dir(old_hub)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test vanish after it."""
    monkeypatch.setattr(models._MODELS, "_entries", dict(models._MODELS._entries))


def _images(n: int = 2) -> list[Image.Image]:
    return [
        Image.new("RGB", (300 + 17 * i, 200 + 11 * i), (40 * i + 20, 90, 200 - 30 * i))
        for i in range(n)
    ]


def _batch(emb) -> torch.Tensor:
    return torch.stack([emb.transform(im) for im in _images(2)])


# ------------------------------------------------------------------------------------ registry


def test_zoo_entries_are_valid_and_unique():
    specs = models.load_model_file(models.ZOO_FILE)
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert set(names) == set(list_models(include_tiny=True))
    for spec in specs:
        assert spec.problems() == []
        assert spec.family in ("supervised", "ssl", "text-image")
        assert spec.backbone in ("convolutional", "transformer")
        assert spec.paper_name and spec.identifier
        assert isinstance(spec.embed_dim, int) and spec.embed_dim > 0
        assert not spec.trust_remote_code, f"{spec.name} must not need remote code"


def test_every_family_source_and_paper_model_present():
    paper = [get_model_spec(n) for n in list_models()]
    assert {s.family for s in paper} == {"supervised", "ssl", "text-image"}
    assert {s.source for s in paper} == {"timm", "open_clip", "hf-hub", "torch.hub"}
    assert {s.backbone for s in paper} == {"convolutional", "transformer"}
    assert not PAPER_LABELS - {s.paper_name for s in paper}, "paper models missing"
    assert not any(s.tiny for s in paper)
    assert set(list_models(family="ssl")) == {
        "dino_vitb16",
        "dino_resnet50",
        "dinov2_vitb14",
        "mae_vitb16",
        "maws_vitb16",
    }
    assert list_models(source="hf-hub") == ["marqo_ecommerce_b"]
    assert set(TINY) <= set(list_models(include_tiny=True)) - set(list_models())


def test_identifiers_exist_in_the_installed_libraries():
    import open_clip
    import timm

    models._open_clip()  # registers the tiny open_clip config
    oc_pretrained = set(open_clip.list_pretrained())
    timm_pretrained = set(timm.list_pretrained())
    for name in list_models(include_tiny=True):
        spec = get_model_spec(name)
        if spec.source == "timm" and (spec.packaged_weights or spec.control):
            assert timm.is_model(spec.identifier), spec.name  # weights not from timm's hub
        elif spec.source == "timm":
            assert spec.full_id in timm_pretrained, spec.name
        elif spec.source == "open_clip":
            assert spec.identifier in open_clip.list_models(), spec.name
            if spec.pretrained:
                assert (spec.identifier, spec.pretrained) in oc_pretrained, spec.name
        elif spec.source == "torch.hub":
            assert timm.is_model(spec.arch) and spec.weights_url.startswith("https://")
        elif spec.source == "hf-hub":
            assert spec.arch in open_clip.list_models(), spec.name


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownNameError, match=r"Did you mean 'resnet50'") as err:
        create_embedder("resnet_50", weights="random")
    assert "timm:<arch>" in str(err.value)
    with pytest.raises(ModelError, match="not a timm architecture"):
        create_embedder("timm:no_such_arch_xyz", weights="random")
    with pytest.raises(ModelError, match="no pretrained tag 'nope'"):
        create_embedder("timm:test_vit.nope", weights="random")
    with pytest.raises(ModelError, match="neither one of"):
        create_embedder("test_vit", weights="pretrianed")
    with pytest.raises(ModelError, match="Unknown family"):
        list_models(family="self-supervised")


def test_invalid_specs_are_refused_with_the_reason():
    base = dict(
        name="x",
        source="timm",
        identifier="resnet50",
        pretrained=None,
        family="supervised",
        backbone="convolutional",
        paper_name="X",
    )
    with pytest.raises(ModelError, match="family='sup'"):
        ModelSpec(**{**base, "family": "sup"})
    with pytest.raises(ModelError, match="no ':'"):
        ModelSpec(**{**base, "name": "timm:x"})
    hub = {**base, "source": "torch.hub", "identifier": "owner/repo", "pretrained": "entry"}
    with pytest.raises(ModelError, match="trust_remote_code"):
        ModelSpec(**hub, data_config={"input_size": [3, 8, 8]})


def test_model_file_typo_names_file_key_and_suggestion(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text(
        "models:\n  - name: a\n    source: timm\n    identifier: resnet50\n"
        "    family: supervised\n    backbone: convolutional\n    paper_name: A\n    embed_dm: 3\n"
    )
    with pytest.raises(
        ModelError, match=r"models\[0\] \('a'\).*'embed_dm' \(did you mean 'embed_dim'"
    ):
        models.load_model_file(path)


# ---------------------------------------------------------------------------- tiny embedders


@pytest.mark.parametrize("name", TINY)
def test_tiny_embedder_shapes_and_preprocessing(name):
    emb = create_embedder(name, weights="random")
    assert emb.spec.name == name and emb.embed_dim == emb.spec.embed_dim
    assert not emb.model.training
    x = _batch(emb)
    assert tuple(x.shape[1:]) == emb.input_size
    out = emb(x)
    assert out.shape == (2, emb.embed_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.allclose(emb.embed_pil(_images(2)), out)
    assert emb.weights_used == {
        "kind": "random",
        "id": emb.spec.full_id,
        "seed": models.RANDOM_SEED,
        "fell_back": False,
    }
    # the preprocessing is the model's own: its normalisation constants are in the transform
    assert {"mean", "std", "interpolation", "input_size"} <= set(emb.data_config)
    assert str(round(emb.data_config["mean"][0], 4))[:5] in repr(emb.transform)


def test_transform_comes_from_the_model_config():
    vit, res = (
        create_embedder("test_vit", weights="random"),
        create_embedder("test_resnet", weights="random"),
    )
    # timm's test_resnet config uses bilinear, test_vit bicubic: the transforms must follow
    assert vit.data_config["interpolation"] == "bicubic" and "bicubic" in repr(vit.transform)
    assert res.data_config["interpolation"] == "bilinear" and "bilinear" in repr(res.transform)
    assert vit.preprocessing_fingerprint() != res.preprocessing_fingerprint()


def test_random_weights_are_repeatable_and_identity_is_stable():
    a, b = (
        create_embedder("test_clip", weights="random"),
        create_embedder("test_clip", weights="random"),
    )
    x = _batch(a)
    assert torch.equal(a(x), b(x))
    assert a.preprocessing_fingerprint() == b.preprocessing_fingerprint()
    ident = a.cache_identity()
    assert ident == b.cache_identity()
    json.dumps(ident)  # the embedding cache stores it as JSON
    assert ident["model"] == "test_clip" and ident["weights"]["kind"] == "random"


def test_open_clip_embedder_is_the_image_tower_only():
    emb = create_embedder("test_clip", weights="random")
    names = [n for n, _ in emb.model.named_parameters()]
    assert names and not any("token_embedding" in n or "text" in n for n in names)
    ref = create_embedder("open_clip:embbench-tiny-clip", weights="random")
    x = _batch(emb)
    assert torch.equal(emb(x), ref(x))  # ad-hoc prefixed names build the same model


# -------------------------------------------------------------------------------- checkpoints


def test_timm_checkpoint_round_trip(tmp_path):
    src = create_embedder("test_resnet", weights="random")
    with torch.no_grad():  # make the weights differ from the seeded random init
        for p in src.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "ft.pt"
    torch.save(src.model.state_dict(), path)
    loaded = create_embedder("test_resnet", weights=str(path))
    x = _batch(src)
    assert torch.equal(loaded(x), src(x))
    assert not torch.equal(loaded(x), create_embedder("test_resnet", weights="random")(x))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.weights_used["kind"] == "checkpoint"
    assert loaded.weights_used["sha256"] == sha
    assert loaded.cache_identity()["weights"] == {
        "kind": "checkpoint",
        "id": "test_resnet.r160_in1k",
        "sha256": sha,
    }
    same = create_embedder("test_resnet", checkpoint=path)
    assert same.weights_used["sha256"] == sha


def test_checkpoint_with_classifier_head_loads_headless(tmp_path):
    import timm

    torch.manual_seed(1)
    clf = timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()
    path = tmp_path / "clf.pth"
    torch.save({"state_dict": clf.state_dict(), "epoch": 3}, path)  # trainer-style wrapper
    emb = create_embedder("test_resnet", weights=path)
    x = _batch(emb)
    with torch.no_grad():
        expected = clf.forward_head(clf.forward_features(x), pre_logits=True)
    assert torch.allclose(emb(x), expected, atol=1e-6)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save(create_embedder("test_vit", weights="random").model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing key\(s\)") as err:
        create_embedder("test_resnet", weights=path)
    assert str(path) in str(err.value)
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read checkpoint"):
        create_embedder("test_resnet", weights=bad)
    with pytest.raises(ModelError, match="neither one of"):
        create_embedder("test_resnet", weights=str(tmp_path / "missing.pt"))


def test_open_clip_checkpoint_round_trip_full_and_visual_only(tmp_path):
    import open_clip

    models._open_clip()
    torch.manual_seed(3)
    clip = open_clip.create_model("embbench-tiny-clip", pretrained=None).eval()
    full = tmp_path / "clip_full.pt"
    torch.save(clip.state_dict(), full)  # includes the text tower, which is ignored
    visual = tmp_path / "clip_visual.pt"
    torch.save(clip.visual.state_dict(), visual)
    a = create_embedder("test_clip", weights=full)
    b = create_embedder("test_clip", weights=visual)
    x = _batch(a)
    with torch.no_grad():
        expected = clip.encode_image(x)
    assert torch.allclose(a(x), expected, atol=1e-6) and torch.equal(a(x), b(x))


def test_register_finetuned_checkpoint_by_name(tmp_path, scratch_registry):
    src = create_embedder("test_vit", weights="random")
    with torch.no_grad():
        for p in src.model.parameters():
            p.mul_(1.5)
    path = tmp_path / "best.pt"
    torch.save(src.model.state_dict(), path)
    spec = models.register_finetuned("test_vit_ft_demo", "test_vit", path)
    assert spec.source == "checkpoint" and spec.family == "supervised"
    assert "test_vit_ft_demo" in list_models(source="checkpoint", include_tiny=True)
    emb = create_embedder("test_vit_ft_demo")
    x = _batch(src)
    assert torch.equal(emb(x), src(x))
    assert emb.weights_used["kind"] == "checkpoint"
    assert emb.preprocessing_fingerprint() == src.preprocessing_fingerprint()
    with pytest.raises(ValueError, match="already registered"):
        models.register_finetuned("test_vit_ft_demo", "test_vit", path)
    path.unlink()
    with pytest.raises(ModelError, match="does not exist"):
        create_embedder("test_vit_ft_demo")


# ---------------------------------------------------------------------- pretrained / offline


@pytest.mark.parametrize("name", ["test_vit", "test_clip", "siglip_b16", "marqo_ecommerce_b"])
def test_pretrained_offline_raises_a_clear_error(name, offline):
    with pytest.raises(WeightsUnavailableError) as err:
        create_embedder(name)  # weights="pretrained" is the default
    msg = str(err.value)
    assert repr(name) in msg and "Fix:" in msg and "'random'" in msg


def test_torch_hub_entry_loads_state_dict_without_remote_code(tmp_path, offline, scratch_registry):
    # a torch.hub-style entry with a tiny timm arch: offline + not cached -> clear error
    spec = ModelSpec(
        name="hub_tiny",
        source="torch.hub",
        identifier="someone/repo:main",
        pretrained="entry",
        arch="test_resnet",
        weights_url="https://example.invalid/hub_tiny_weights.pth",
        data_config={
            "input_size": [3, 96, 96],
            "interpolation": "bicubic",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "crop_pct": 0.875,
        },
        family="ssl",
        backbone="convolutional",
        paper_name="hub tiny",
        embed_dim=96,
    )
    models.register_model(spec)
    with pytest.raises(WeightsUnavailableError, match="not in the torch hub cache"):
        create_embedder("hub_tiny")
    # random weights build the arch with the spec's preprocessing (not the arch's defaults)
    emb = create_embedder("hub_tiny", weights="random")
    assert emb.input_size == (3, 96, 96) and emb.data_config["crop_pct"] == 0.875
    # once the published state dict is in the torch hub cache, it is loaded (strictly)
    src = create_embedder("test_resnet", weights="random")
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(0.5)
    cached = tmp_path / "torch_hub" / "checkpoints" / "hub_tiny_weights.pth"
    cached.parent.mkdir(parents=True)
    torch.save(src.model.state_dict(), cached)
    hub = create_embedder("hub_tiny")
    x = torch.stack([hub.transform(im) for im in _images(2)])
    assert torch.equal(hub(x), src(x))
    assert hub.weights_used["kind"] == "pretrained"
    assert hub.weights_used["sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()


def test_hf_hub_entry_builds_its_arch_offline(offline, scratch_registry):
    models.register_model(
        ModelSpec(
            name="hub_clip_tiny",
            source="hf-hub",
            identifier="hf-hub:someone/tiny-clip",
            pretrained=None,
            arch="embbench-tiny-clip",
            data_config={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            family="text-image",
            backbone="transformer",
            paper_name="hub tiny clip",
            embed_dim=32,
        )
    )
    emb = create_embedder("hub_clip_tiny", weights="random")
    assert emb.data_config["mean"] == (0.5, 0.5, 0.5)
    assert emb(_batch(emb)).shape == (2, 32)
    with pytest.raises(WeightsUnavailableError, match="hub_clip_tiny"):
        create_embedder("hub_clip_tiny")


def test_auto_falls_back_to_random_and_records_it(offline, caplog):
    with caplog.at_level(logging.INFO, logger="embbench.models"):
        emb = create_embedder("test_vit", weights="auto")
    assert "FALLING BACK TO RANDOM WEIGHTS" in caplog.text
    assert emb.weights_used["kind"] == "random" and emb.weights_used["fell_back"] is True
    assert "test_vit" in emb.weights_used["reason"]
    rnd = create_embedder("test_vit", weights="random")
    assert emb.cache_identity() == rnd.cache_identity()  # same vectors, same cache entry
    x = _batch(emb)
    assert torch.equal(emb(x), rnd(x))


# -------------------------------------------------------------------------------- model facts


def _tiny_clip_params_by_hand() -> int:
    cfg = json.loads((models.CONFIG_DIR / "embbench-tiny-clip.json").read_text())
    v, d = cfg["vision_cfg"], cfg["vision_cfg"]["width"]
    tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    hidden = int(d * v["mlp_ratio"])
    block = (
        2 * d  # ln_1
        + 3 * d * d
        + 3 * d  # attention in_proj
        + d * d
        + d  # attention out_proj
        + 2 * d  # ln_2
        + d * hidden
        + hidden  # mlp c_fc
        + hidden * d
        + d  # mlp c_proj
    )
    return (
        3 * v["patch_size"] ** 2 * d  # patch embedding conv, no bias
        + d  # class embedding
        + tokens * d  # positional embedding
        + 2 * d  # ln_pre
        + v["layers"] * block
        + 2 * d  # ln_post
        + d * cfg["embed_dim"]  # projection
    )


def test_model_facts_count_parameters(monkeypatch):
    facts = model_facts("test_clip")
    assert facts["params"] == _tiny_clip_params_by_hand() == 119552
    assert facts["params_m"] == pytest.approx(0.119552, abs=1e-3)
    assert facts["embed_dim"] == 32 and facts["input_size"] == [3, 64, 64]
    assert facts["gflops"] > 0 and facts["gmacs"] == pytest.approx(facts["gflops"] / 2, rel=1e-3)
    cached = json.loads((cache_dir() / "model_facts.json").read_text())
    assert cached["test_clip"]["params"] == 119552

    def boom(*a, **k):
        raise AssertionError("model_facts should have used its cache")

    monkeypatch.setattr(models.facts, "create_embedder", boom)
    assert model_facts("test_clip") == facts


def test_model_facts_flops_match_a_hand_count():
    # one multiply-add = 2 FLOPs; attention matmuls included (MHA fast path and fused SDPA off)
    cfg = json.loads((models.CONFIG_DIR / "embbench-tiny-clip.json").read_text())
    v, d = cfg["vision_cfg"], cfg["vision_cfg"]["width"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    t, hidden = patches + 1, int(d * v["mlp_ratio"])
    patch_embed = 2 * patches * d * 3 * v["patch_size"] ** 2
    linears = 2 * t * (d * 3 * d + d * d + d * hidden + hidden * d)
    attention = 2 * (2 * t * t * d)  # q @ k^T and attn @ v over all heads
    projection = 2 * d * cfg["embed_dim"]
    expected = patch_embed + v["layers"] * (linears + attention) + projection
    facts = model_facts("test_clip")
    assert facts["gflops"] == pytest.approx(expected / 1e9, abs=1e-6)
    assert expected == 3_953_152


# ----------------------------------------------------------------- real paper architectures


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "vit_b16", "clip_vitb16_openai", "dino_resnet50"])
def test_paper_architectures_build_with_registered_dims(name):
    emb = create_embedder(name, weights="random")
    assert emb.embed_dim == get_model_spec(name).embed_dim
    out = emb(torch.zeros(1, *emb.input_size))
    assert out.shape == (1, emb.spec.embed_dim)
