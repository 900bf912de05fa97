"""`schedules`: pretrain_finetune trains on the mix, then again on the real subset only, paired with the same
baseline as the mixed cell (BreastMNIST, tiny CNN)."""

import mlflow

from synaug.experiment.grid import Synthetic, experiment, grid
from synaug.experiment.runs import search

CNN = {
    "cnn": {
        "model": {
            "class_path": "synaug.classifiers.ImageClassifier",
            "init_args": {"backbone": "basic_cnn", "model_kwargs": {"hidden": [32, 16]}},
        }
    }
}


def test_schedule_is_an_axis_of_synthetic_cells_and_controls():
    source = Synthetic(folders=["x"], ratios=[0.5])
    cells = grid({}, CNN, synthetic={"t": source}, controls_dir="c", schedules=["mix", "pretrain_finetune"])
    names = [c.name for c in cells]
    assert names[0] == "cnn/none/real=1/none"  # one baseline for both schedules
    tested = [c for c in cells if c.generator == "t"]
    assert [c.schedule for c in tested] == ["mix", "pretrain_finetune"]
    for cell in tested:
        assert cell.baseline.name == names[0]
        assert {c.schedule for c in cell.controls(cells)} == {cell.schedule}
        assert len(cell.controls(cells)) == 2


def test_pretrain_finetune_ends_on_real_images_only(breast_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    source = Synthetic(folders=["t-{real}-{subset_seed}"], ratios=[1.0], transform="autoaugment")
    experiment(
        name="schedule",
        base={
            "data": {"root": str(breast_npz), "image_size": 28, "batch_size": 64},
            "trainer": {"max_epochs": 1, "limit_train_batches": 1, "enable_progress_bar": False},
        },
        classifiers=CNN,
        real_fractions=[0.1],
        synthetic={"transform": source},
        schedules=["pretrain_finetune"],
        seeds=1,
        controls=False,
        out=str(tmp_path / "report"),
        tracking=uri,
    )
    client = mlflow.MlflowClient(uri)
    exp_id = client.get_experiment_by_name("schedule").experiment_id
    (run,) = search(client, exp_id, {"level": "seed", "schedule": "pretrain_finetune"})
    assert run.data.tags["cell"] == "cnn/none/real=0.1/transform@1/pretrain_finetune"
    m = run.data.metrics
    assert m["data/synthetic/malignant"] > 0  # pretrained with synthetic images
    assert m["data/finetune_synthetic"] == 0 and m["data/finetune_real"] > 0  # fine-tuned on real ones only
    assert "test/f1_macro" in m
