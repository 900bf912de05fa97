"""`synaug explain` end to end on BreastMNIST (28 px): a basic CNN trained for a few steps, a tiny synthetic folder,
Grad-CAM maps of real vs synthetic images logged to MLflow."""

import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser
from safetensors.torch import save_file

from synaug import notebooks, tracking
from synaug.classifiers import ImageClassifier
from synaug.classifiers.finetune import load_classifier
from synaug.cli import main
from synaug.data import load_source
from synaug.evaluation.explain import explain, explain_checkpoint, resolve_method
from synaug.models.backbones import create_backbone

CLASSES = ["malignant", "normal_benign"]
EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "explain" / "example.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared CPU: a second thread only waits for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, breast_npz) -> tuple[Path, Path]:
    """A basic CNN checkpoint trained for a few steps and a synthetic folder of 6 images per class."""
    root = tmp_path_factory.mktemp("explain")
    checkpoint = notebooks.demo_classifier(breast_npz, root, max_steps=20)
    return checkpoint, notebooks.demo_synthetic(breast_npz, root / "synthetic", n=6)


def test_explain_command_logs_maps_and_similarity_per_class(trained, breast_npz, tmp_path, capsys):
    checkpoint, synthetic = trained
    config = tmp_path / "explain.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "checkpoint": str(checkpoint),
                "data": {"root": str(breast_npz), "batch_size": 32},  # ClassificationData arguments
                "synthetic": [str(synthetic)],
                "n": 5,
                "experiment": "explain-test",
            }
        )
    )
    main(["explain", "-c", str(config)])

    out = capsys.readouterr().out
    assert "hirescam" in out and all(c in out for c in CLASSES)  # auto: HiResCAM for the basic CNN
    client = mlflow.MlflowClient(tracking.tracking_uri())
    run = client.search_runs([client.get_experiment_by_name("explain-test").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["synaug.command"] == "explain"
    assert run.data.params["method"] == "hirescam" and run.data.params["split"] == "test"
    metrics = run.data.metrics
    kinds = ("similarity", "cosine", "ssim", "real_acc", "synthetic_acc")
    assert {f"explain/{k}/{c}" for k in kinds for c in CLASSES} == metrics.keys()
    assert all(-1 <= metrics[f"explain/similarity/{c}"] <= 1 for c in CLASSES)
    assert all(0 <= metrics[f"explain/synthetic_acc/{c}"] <= 1 for c in CLASSES)
    for c in CLASSES:
        files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, f"explain/{c}")}
        assert files == {"overlays.png", "mean_maps.png"}
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "explain/similarity.csv", str(tmp_path)))
    assert table["class"].tolist() == CLASSES
    assert table["n_real"].tolist() == [5, 5] and table["n_synthetic"].tolist() == [5, 5]
    assert math.isclose(table["pearson"][0], metrics["explain/similarity/malignant"])


def test_maps_explain_what_the_model_sees(trained, breast_npz):
    checkpoint, synthetic = trained
    (result,), names = explain_checkpoint(checkpoint, str(breast_npz), [str(synthetic)], ["malignant"], n=4)
    assert names == CLASSES and result["class_index"] == 0 and result["method"] == "hirescam"
    assert result["real_maps"].shape == (4, 28, 28) and result["synthetic_maps"].shape == (4, 28, 28)

    # The real images are test images of the class, and the tensors given to `model.net` are what the model's
    # own forward (which normalises) feeds it.
    source = load_source(str(breast_npz))
    items = source.items.set_index("id").loc[result["real_ids"]]
    assert set(items["split"]) == {"test"} and set(items["label"]) == {0}
    rows = [int(source.items.index[source.items["id"] == i][0]) for i in result["real_ids"]]
    x = torch.from_numpy(np.stack([source.load(r, 28, 1) for r in rows])).float() / 255
    model = load_classifier(checkpoint)
    with torch.no_grad():
        logits = model(x)
        assert torch.allclose(model.net(result["real_images"]), logits, atol=1e-5)
    assert result["real_acc"] == pytest.approx((logits.argmax(1) == 0).float().mean().item())

    manifest = notebooks.manifest(synthetic)
    assert set(result["synthetic_files"]) <= set(manifest.loc[manifest["class"] == "malignant", "file"])


def test_auto_method_is_hirescam_only_for_the_basic_cnn():
    assert resolve_method(create_backbone("basic_cnn", num_classes=2), "auto") == "hirescam"
    assert resolve_method(create_backbone("resnet10t", num_classes=2), "auto") == "gradcam"
    assert resolve_method(create_backbone("basic_cnn", num_classes=2), "gradcam++") == "gradcam++"


def test_pretrained_classifier_loads_offline_with_its_normalisation(tmp_path):
    weights = tmp_path / "tiny.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("test_efficientnet").state_dict(), weights)
    clf = ImageClassifier(
        backbone="test_efficientnet", checkpoint_path=str(weights), in_chans=1, image_size=24
    ).eval()
    assert not torch.allclose(clf.mean, torch.tensor(0.5))  # the pretrained statistics, not the 0.5 default
    checkpoint = tmp_path / "clf.ckpt"
    torch.save({"state_dict": clf.state_dict(), "hyper_parameters": dict(clf.hparams)}, checkpoint)
    weights.unlink()  # the backbone's file is gone, as on a machine that only has the checkpoint

    loaded = load_classifier(checkpoint)
    assert torch.equal(loaded.mean, clf.mean) and torch.equal(loaded.std, clf.std)
    x = torch.rand(2, 1, 24, 24)
    with torch.no_grad():
        assert torch.allclose(loaded(x), clf(x))


def test_clear_errors(trained, breast_npz):
    checkpoint, synthetic = trained
    with pytest.raises(ValueError, match="no synthetic folders"):
        explain_checkpoint(checkpoint, str(breast_npz))
    with pytest.raises(ValueError, match=r"classes \['glioma'\] are not among"):
        explain_checkpoint(checkpoint, str(breast_npz), [str(synthetic)], ["glioma"])
    with pytest.raises(ValueError, match="3 channel"):
        explain(str(checkpoint), {"root": str(breast_npz), "channels": 3}, [str(synthetic)])


def test_example_config_matches_the_signature():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_function_arguments(explain, as_positional=True)
    cfg = parser.parse_args(["-c", str(EXAMPLE)])
    assert cfg.checkpoint and cfg.synthetic and cfg.method == "auto"
