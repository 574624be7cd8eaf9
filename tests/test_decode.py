"""Decoding for the forward pass: uint8 batches equal the model's transform; decoding ahead."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms

from embbench.catalogue import Catalogue
from embbench.decode import DecodeAhead, Preprocess, decode_row, split_transform
from embbench.embed import embed_split
from embbench.images import load_rgb

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory):
    """A user's catalogue, not the demo's: JPEG and PNG of many modes and sizes, one bad file."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)

    def noise(h, w, c=3):
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    made = {
        "big.jpg": Image.fromarray(noise(480, 640)),
        "tall.jpg": Image.fromarray(noise(300, 120)),
        "tiny.jpg": Image.fromarray(noise(9, 13)),
        "gray.jpg": Image.fromarray(noise(200, 200, 1)[..., 0]),
        "rgba.png": Image.fromarray(noise(150, 220, 4)),
        "sixteen.png": Image.fromarray(noise(64, 96, 1)[..., 0].astype(np.int32) * 257).convert(
            "I;16"
        ),
        "palette.png": Image.fromarray(noise(70, 50)).convert("P"),
        "square.png": Image.fromarray(noise(384, 384)),
    }
    paths = []
    for name, im in made.items():
        im.save(root / name)
        paths.append(str(root / name))
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return paths, str(root / "broken.jpg")


def _transforms():
    from embbench.models import create_embedder

    yield "timm test_resnet", create_embedder("test_resnet", weights="random").transform
    yield (
        "open_clip-like",
        transforms.Compose(  # open_clip's eval transform has this shape
            [
                transforms.Resize(64, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(64),
                lambda im: im.convert("RGB"),
                transforms.ToTensor(),
                transforms.Normalize([0.48145466, 0.4578275, 0.40821073], [0.2686, 0.2613, 0.2758]),
            ]
        ),
    )


@pytest.mark.parametrize("label", ["timm test_resnet", "open_clip-like"])
def test_uint8_batches_equal_the_transform_bit_for_bit(mixed_images, label):
    transform = dict(_transforms())[label]
    prep = split_transform(transform)
    assert prep.pil_steps is not None, "a ToTensor + Normalize transform is split"
    images = [load_rgb(p) for p in mixed_images[0]]
    items = [prep.image(im) for im in images]
    assert all(t.dtype == torch.uint8 for t in items)
    got = prep.batch(items)
    want = torch.stack([transform(im) for im in images])
    assert torch.equal(got, want)  # the same float operations in the same order
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_transforms_that_cannot_be_split_run_whole(mixed_images):
    resize_only = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    tensor_step_last = transforms.Compose(
        [
            transforms.Resize((32, 32)),
            transforms.ToTensor(),
            transforms.Normalize(0.5, 0.5),
            transforms.Lambda(lambda t: t * 2),
        ]
    )
    for transform in (
        resize_only,
        tensor_step_last,
        lambda im: transforms.functional.to_tensor(im.resize((20, 20))),
    ):
        prep = split_transform(transform)
        assert prep.pil_steps is None
        images = [load_rgb(p) for p in mixed_images[0][:3]]
        want = torch.stack([transform(im) for im in images])
        assert torch.equal(prep.batch([prep.image(im) for im in images]), want)


def test_a_step_that_leaves_pil_mid_way_is_finished_per_image(mixed_images):
    """A custom step returning a non-RGB image still gets the transform's own result."""
    transform = transforms.Compose(
        [
            transforms.Resize((24, 24)),
            lambda im: im.convert("L"),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.25]),
        ]
    )
    prep = split_transform(transform)
    images = [load_rgb(p) for p in mixed_images[0][:3]]
    want = torch.stack([transform(im) for im in images])
    assert torch.equal(prep.batch([prep.image(im) for im in images]), want)


@pytest.mark.parametrize("ahead", [1, 3])
def test_decode_ahead_yields_every_batch_in_order_with_bad_rows(mixed_images, ahead):
    paths = [*mixed_images[0], mixed_images[1]]
    prep = Preprocess(transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()]))
    batches = [[0, 1, 2], [3, 8, 4], [5, 6], [7]]
    got = list(DecodeAhead(paths, prep, batches, ahead=ahead))
    assert [idx for idx, _, _ in got] == [[0, 1, 2], [3, 4], [5, 6], [7]]
    assert [i for _, _, bad in got for i, _ in bad] == [8]
    assert "not an image" in got[1][2][0][1]
    for idx, x, _ in got:
        want = torch.stack([decode_row(paths[i], prep)[0] for i in idx])
        assert torch.equal(x, want)


def test_decode_ahead_stops_its_thread_when_the_consumer_stops(mixed_images):
    paths = mixed_images[0]
    prep = Preprocess(transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()]))
    it = iter(DecodeAhead(paths, prep, [[i] for i in range(len(paths))], ahead=1))
    next(it)
    it.close()  # what a `break` or an exception in the model's loop does
    assert not [t for t in threading.enumerate() if t.name == "embbench-decode"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_embed_split_vectors_equal_a_plain_reference_forward(mixed_images, tmp_path, workers):
    """``embed_split`` (uint8 batches, decoded ahead or in a worker) against the model's transform
    applied image by image and one plain NCHW forward.

    Tolerance: max abs difference 1e-4 and cosine >= 0.99999 (the inputs are bit-identical,
    ``test_uint8_batches_equal_the_transform_bit_for_bit``; only channels-last kernels differ).
    """
    from embbench.models import create_embedder

    paths, broken = mixed_images
    items = pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(len(paths) + 1)],
            "path": [*paths, broken],
            "split": "test",
            "product": [f"p{k % 3}" for k in range(len(paths) + 1)],
            "category": "c",
        }
    )
    cat = Catalogue("mixed", items, ("product", "category"), "product", root=str(tmp_path))
    torch.manual_seed(0)
    emb = create_embedder("test_resnet", weights="random")
    reference = copy.deepcopy(emb.model).eval()
    got = embed_split(
        emb, cat, "test", batch_size=3, num_workers=workers, progress=False,
        cache_root=tmp_path / "cache", overwrite=True,
    )  # fmt: skip
    assert [f["item_id"] for f in got.failed] == [f"i{len(paths)}"]
    x = torch.stack([emb.transform(load_rgb(p)) for p in paths])
    with torch.inference_mode():
        want = reference(x).float().numpy()
    order = [list(got.item_ids.astype(str)).index(f"i{k}") for k in range(len(paths))]
    vec = np.asarray(got.vectors)[order]
    assert np.abs(vec - want).max() <= 1e-4
    cos = (vec * want).sum(1) / np.linalg.norm(vec, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999
