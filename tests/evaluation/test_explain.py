import mlflow
import numpy as np
import pytest
import torch
import torch.nn as nn

from synaug.evaluation.explain import (
    LogOddsTarget,
    compare_real_synthetic,
    gradcam,
    log_explanations,
    map_similarity,
    target_layers,
)
from synaug.models.backbones import create_backbone
from synaug.tracking import artifact_location, tracking_uri

SIZE = 32
PATCH = (slice(4, 12), slice(18, 26))  # off-centre, and not symmetric under a transpose


def planted(n: int, patch: tuple[slice, slice] | None = PATCH) -> torch.Tensor:
    """Noise images (n, 1, SIZE, SIZE), with a bright square at `patch`."""
    x = torch.randn(n, 1, SIZE, SIZE)
    if patch is not None:
        x[:, :, patch[0], patch[1]] += 3.0
    return x


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: on a shared CPU, a second thread only waits for the first (1 s vs up to 20 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_model() -> nn.Module:
    """A small basic_cnn trained to tell images with the planted patch (class 1) from plain noise (class 0)."""
    torch.manual_seed(0)
    model = create_backbone("basic_cnn", num_classes=2, in_chans=1, channels=(8, 16), hidden=(32, 16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        y = torch.randint(0, 2, (32,))
        x = torch.where(y[:, None, None, None] == 1, planted(32), planted(32, None))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = planted(16), torch.ones(16, dtype=torch.long)
    assert (model(x).argmax(1) == y).all(), "toy classifier did not learn the patch"
    return model


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet10t", {}),
        ("basic_cnn", {"channels": (8, 16), "hidden": (32, 16)}),
        ("vit_tiny_patch16_224", {"img_size": (48, 64), "depth": 2}),
    ],
)
def test_gradcam_maps_have_input_size(name, kwargs):
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=3, **kwargs).train()
    images = torch.randn(3, 3, 48, 64)  # non-square: a swapped height and width would show
    maps = gradcam(model, images, [0, 1, 2], batch_size=2)
    assert maps.shape == (3, 48, 64)
    assert maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0.99
    # The target class matters, and the caller's model comes back in training mode without gradients.
    assert not np.allclose(maps[:1], gradcam(model, images[:1], [1]))
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_cnn_target_layers():
    resnet = create_backbone("resnet10t", num_classes=2)
    assert target_layers(resnet) == ([resnet.layer4[-1]], None)
    cnn = create_backbone("basic_cnn", num_classes=2)
    assert target_layers(cnn) == ([cnn.features[5]], None)  # the last conv block's max-pool, not the 8x8 pool


def test_vit_reshape_uses_prefix_tokens_and_grid():
    model = create_backbone("vit_tiny_patch16_224", num_classes=2, img_size=(64, 128), depth=1, reg_tokens=2)
    (layer,), reshape = target_layers(model)
    assert layer is model.blocks[-1].norm1
    tokens = torch.arange(3 + 32, dtype=torch.float)[None, :, None].expand(1, -1, 5)  # cls + 2 registers, 4x8
    grid = reshape(tokens)
    assert grid.shape == (1, 5, 4, 8)
    assert grid[0, 0, 0, 0] == 3 and grid[0, 0, 0, 1] == 4 and grid[0, 0, 1, 0] == 11  # row-major patches
    with pytest.raises(ValueError, match="patch grid is 4x8"):
        reshape(tokens[:, :-8])


def test_unsupported_model_and_method_raise():
    with pytest.raises(TypeError, match="Sequential"):
        target_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    with pytest.raises(ValueError, match="Unknown CAM method"):
        gradcam(create_backbone("resnet10t", num_classes=2), torch.randn(1, 3, 32, 32), [0], method="cam")


def test_gradcam_peaks_inside_planted_patch(toy_model):
    # HiResCAM: the basic CNN's head flattens the feature map, which Grad-CAM's averaged weights do not fit.
    maps = gradcam(toy_model, planted(16), [1] * 16, method="hirescam")
    inside = np.zeros((SIZE, SIZE), dtype=bool)
    inside[PATCH] = True
    assert maps[:, inside].mean() > 5 * maps[:, ~inside].mean()
    argmax = maps.reshape(len(maps), -1).argmax(1)
    assert inside.ravel()[argmax].mean() >= 0.9


def test_gradcam_equals_hirescam_for_pooled_resnet():
    # The last block feeds the global average pool, so the gradients are uniform over space and the two agree.
    torch.manual_seed(0)
    model = create_backbone("resnet10t", num_classes=3)
    images = torch.randn(4, 3, 96, 64)
    expected = gradcam(model, images, [0, 1, 2, 0], method="hirescam")
    np.testing.assert_allclose(gradcam(model, images, [0, 1, 2, 0]), expected, atol=1e-4)


def test_log_odds_target():
    logits = torch.tensor([2.0, -1.0, 0.5])
    p = logits.softmax(0)
    assert LogOddsTarget(2)(logits).item() == pytest.approx(torch.log(p[2] / (1 - p[2])).item(), rel=1e-5)
    assert LogOddsTarget(0)(logits[:2]).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="2 or more classes"):
        LogOddsTarget(0)(logits[:1])


def test_gradcam_through_frozen_backbone(toy_model):
    images = planted(4)
    expected = gradcam(toy_model, images, [1] * 4, method="hirescam")
    assert expected.max() > 0.99
    toy_model.requires_grad_(False)
    try:
        np.testing.assert_allclose(
            gradcam(toy_model, images, [1] * 4, method="hirescam"), expected, atol=1e-5
        )
    finally:
        toy_model.requires_grad_(True)


def blob(centre: tuple[int, int], size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 20.0)


def test_map_similarity():
    a = blob((8, 8))
    for score in map_similarity(a, a).values():
        assert score == pytest.approx(1.0)
    near, far = map_similarity(a, blob((10, 10))), map_similarity(a, blob((24, 24)))
    for key in ("pearson", "cosine", "ssim"):
        assert far[key] < near[key] < 0.999
    with pytest.raises(ValueError, match="differ in shape"):
        map_similarity(a, a[:-1])


def test_map_similarity_ssim_of_flat_maps_is_the_luminance_term():
    # No variance, no covariance: SSIM is (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1), C1 = (0.01 x data range 1)^2
    ssim = map_similarity(np.full((16, 16), 0.2), np.full((16, 16), 0.6))["ssim"]
    assert ssim == pytest.approx((2 * 0.2 * 0.6 + 1e-4) / (0.2**2 + 0.6**2 + 1e-4), abs=1e-9)


def test_compare_real_synthetic(toy_model):
    real = planted(8)
    same = compare_real_synthetic(toy_model, real, real.clone(), class_index=1, method="hirescam")
    assert same["real_mean"].shape == (SIZE, SIZE) and same["synthetic_maps"].shape == (8, SIZE, SIZE)
    assert same["similarity"]["pearson"] == pytest.approx(1.0)
    # A "generator" that puts the lesion in the wrong place: the classifier looks elsewhere.
    moved_patch = planted(8, (slice(20, 28), slice(4, 12)))
    moved = compare_real_synthetic(toy_model, real, moved_patch, class_index=1, method="hirescam")
    assert moved["similarity"]["pearson"] < 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        compare_real_synthetic(toy_model, real, real[:, :, :16], class_index=1)


def test_log_explanations(toy_model):
    real = planted(3)
    results = [
        compare_real_synthetic(toy_model, real, planted(5), class_index=1, method="hirescam"),
        compare_real_synthetic(
            toy_model, planted(2, None), planted(2, None), class_index=0, method="hirescam"
        ),
    ]
    uri = tracking_uri()
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("test_explain", artifact_location=artifact_location(uri))
    run_id = client.create_run(experiment).info.run_id
    log_explanations(client, run_id, results, ["noise", "patch"])
    for name in ("noise", "patch"):
        logged = {f.path for f in client.list_artifacts(run_id, f"explain/{name}")}
        assert logged == {f"explain/{name}/overlays.png", f"explain/{name}/mean_maps.png"}
    metrics = client.get_run(run_id).data.metrics
    assert metrics["explain/similarity/patch"] == pytest.approx(results[0]["similarity"]["pearson"])
    assert metrics["explain/ssim/noise"] == pytest.approx(results[1]["similarity"]["ssim"])
    assert {"explain/cosine/patch", "explain/cosine/noise"} <= metrics.keys()
