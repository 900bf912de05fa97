import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn
from open_clip.constants import OPENAI_DATASET_MEAN
from sklearn.metrics import adjusted_rand_score

from synaug.data.sources import load_source
from synaug.models.backbones import WeightsUnavailableError
from synaug.sampling import Embedder, cluster_class, create_embedder, embed_images

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """Register a tiny OpenCLIP architecture (random weights only) and return its embedder name."""
    path = tmp_path_factory.mktemp("open_clip") / "synaug-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(path)
    return "open_clip:synaug-tiny-clip"


def test_timm_embedder_preprocesses_with_the_model_data_config():
    embedder = create_embedder("test_efficientnet", pretrained=False, device="cpu")
    assert (embedder.image_size, embedder.in_chans) == (160, 3)
    seen = []
    embedder.model.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    # An image whose pixels are the model's mean: after resize and normalisation the input is ~0 everywhere.
    mean = torch.tensor([0.485, 0.456, 0.406])
    images = (mean * 255).round().to(torch.uint8).view(1, 3, 1, 1).expand(2, 3, 20, 20)
    features = embedder(images)
    assert seen[0].shape == (2, 3, 160, 160)
    assert seen[0].abs().max() < 0.01
    assert features.shape == (2, 256)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2))


def test_grey_images_are_replicated_to_rgb():
    embedder = create_embedder("test_efficientnet", pretrained=False, device="cpu")
    grey = torch.randint(0, 256, (3, 1, 24, 24), dtype=torch.uint8)
    torch.testing.assert_close(embedder(grey), embedder(grey.expand(-1, 3, -1, -1)))


def test_random_weights_are_reproducible():
    a = create_embedder("test_efficientnet", pretrained=False, device="cpu")
    b = create_embedder("test_efficientnet", pretrained=False, device="cpu")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(a(images), b(images))
    assert a.weights == "test_efficientnet:random"


def test_open_clip_embedder_uses_its_preprocess_config(tiny_clip):
    embedder = create_embedder(tiny_clip, pretrained=False, device="cpu")
    assert embedder.image_size == 32
    torch.testing.assert_close(embedder.mean.flatten(), torch.tensor(OPENAI_DATASET_MEAN))
    features = embedder(torch.randint(0, 256, (3, 1, 40, 40), dtype=torch.uint8))
    assert features.shape == (3, TINY_CLIP["embed_dim"])
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))


def test_open_clip_weights_from_a_local_file(tiny_clip, tmp_path):
    torch.manual_seed(123)
    reference = open_clip.create_model(tiny_clip.removeprefix("open_clip:"))
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), path)

    embedder = create_embedder(tiny_clip, checkpoint_path=str(path), device="cpu")
    random = create_embedder(tiny_clip, pretrained=False, device="cpu")
    assert embedder.weights.startswith("open_clip:synaug-tiny-clip:file:")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = (images.float() / 255 - embedder.mean) / embedder.std
    expected = nn.functional.normalize(reference.visual.eval()(x), dim=-1)
    torch.testing.assert_close(embedder(images), expected.detach())
    assert not torch.allclose(random(images), expected)


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "needles"),
    [
        (
            "efficientnet_b0",
            {"pretrained": True},
            WeightsUnavailableError,
            ["efficientnet_b0", "checkpoint_path"],
        ),
        (
            "efficientnet_b0",
            {"checkpoint_path": "/nowhere/model.safetensors"},
            WeightsUnavailableError,
            ["efficientnet_b0", "/nowhere/model.safetensors"],
        ),
        (
            "open_clip:ViT-B-32",
            {"pretrained": "laion2b_s34b_b79k"},
            WeightsUnavailableError,
            ["ViT-B-32", "laion2b_s34b_b79k", "checkpoint_path: /path/open_clip_pytorch_model.bin"],
        ),
        (
            "open_clip:ViT-B-32",
            {"checkpoint_path": "/nowhere/open_clip_pytorch_model.bin"},
            WeightsUnavailableError,
            ["ViT-B-32", "/nowhere/open_clip_pytorch_model.bin", "checkpoint_path:"],
        ),
        (
            "open_clip:ViT-B-32",
            {"pretrained": True},
            ValueError,
            ["ViT-B-32", "checkpoint_path:", "laion2b_s34b_b79k"],
        ),
    ],
)
def test_missing_pretrained_weights_raise_a_clear_error(name, kwargs, error, needles):
    with pytest.raises(error) as info:
        create_embedder(name, device="cpu", **kwargs)
    for needle in needles:
        assert needle in str(info.value)


def test_embeddings_are_cached(groups_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNAUG_CACHE", str(tmp_path))  # an empty cache: other tests embed the same images
    source = load_source(groups_root)
    embedder = create_embedder("test_efficientnet", pretrained=False, device="cpu")
    calls = []
    forward = embedder.forward
    embedder.forward = lambda images: (calls.append(len(images)), forward(images))[1]
    indices = source.indices("train")

    first, held = embed_images(embedder, source, indices, batch_size=4)
    assert sum(calls) == len(indices) and max(calls) == 4
    np.testing.assert_array_equal(held, indices)

    second, held2 = embed_images(embedder, source, indices, batch_size=4)
    assert sum(calls) == len(indices)  # read back, not recomputed
    torch.testing.assert_close(first, second)
    np.testing.assert_array_equal(held, held2)

    embedder.weights = "test_efficientnet:other"  # other weights: another cache entry
    embed_images(embedder, source, indices, batch_size=4)
    assert sum(calls) == 2 * len(indices)


class StripeDetector(nn.Module):
    """Features that tell the two groups apart: variation of the row means (stripes) and of the column means."""

    def forward(self, x):
        return torch.stack([x.mean(dim=(1, 3)).std(dim=1), x.mean(dim=(1, 2)).std(dim=1)], dim=1) + 1e-3


def test_clusters_recover_the_image_groups(groups_root):
    source = load_source(groups_root)
    embedder = Embedder(
        StripeDetector(), name="stripes", weights="none", image_size=32, mean=[0.5] * 3, std=[0.5] * 3
    )
    # every image, not the carved train split: to a perceptual hash the stripes are one group of twins, which
    # carving keeps on one side
    features, held = embed_images(embedder, source, np.arange(len(source)))
    for label in range(len(source.classes)):
        pos = np.flatnonzero(source.items["label"].to_numpy()[held] == label)
        group = source.items["id"].iloc[held[pos]].str.contains("stripes").to_numpy()
        assert 0 < group.sum() < len(group)
        result = cluster_class(features[pos].numpy(), 2, top_n=3)
        assert adjusted_rand_score(group, result.images["cluster"]) == 1.0
