"""Lightning DDP: each rank trains on its shard of every epoch's permutation, the shards together are the epoch's
images, each once; validation and test metrics are over the whole split, gathered from the ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import mlflow
import numpy as np
import pytest
import torch

from synaug.classifiers.finetune import load_classifier
from synaug.data import ClassificationData
from synaug.data.datamodule import epoch_length
from synaug.data.mixing import epoch_order

SYNAUG = Path(sys.executable).with_name("synaug")
ROOT = Path(__file__).resolve().parents[2]


def rank_of(dm, replicas, rank, epoch=0, processed=0, use_distributed_sampler=False):
    """`dm` as rank `rank` of `replicas` sees it: the parts of a Trainer that the DataModule reads."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    dm.trainer = SimpleNamespace(
        distributed_sampler_kwargs={"num_replicas": replicas, "rank": rank},
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        current_epoch=epoch,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler),
    )
    return dm


def shard(dm, replicas, rank, epoch) -> list[list[int]]:
    loader = rank_of(dm, replicas, rank).train_dataloader()
    loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
    batches = [b[2].tolist() for b in loader]
    assert len(loader) == len(batches)  # what Lightning counts on to end the epoch, validate and save
    return batches


def test_epoch_length_drops_a_last_step_that_leaves_a_rank_fewer_than_two_images():
    assert epoch_length(27, 13) == 26 and epoch_length(30, 10) == 30  # one process: as before
    assert epoch_length(546, 64, 2) == 546  # 546 = 4 x 128 + 34: 17 images a rank in the last step
    assert epoch_length(515, 64, 2) == 512  # 3 left: one rank would get a batch of one
    assert epoch_length(513, 64, 2) == 512  # 1 left: one rank would get none
    assert epoch_length(518, 64, 3) == 518  # 518 = 2 x 192 + 134: 44 or 45 a rank


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
@pytest.mark.parametrize("replicas,batch_size", [(2, 68), (3, 50)])
def test_ranks_train_on_disjoint_shards_of_one_permutation_and_resume_in_them(
    breast_npz, loader, replicas, batch_size
):
    kw = dict(
        root=str(breast_npz), image_size=28, batch_size=batch_size, seed=5, loader=loader, num_workers=0
    )
    dm = ClassificationData(**kw)
    dm.setup()
    # 546 training images: 2 x 68 leaves 2 in the last step (dropped), 3 x 50 leaves 96 (kept)
    n = epoch_length(len(dm.train_rows), batch_size, replicas)
    assert n == {2: 544, 3: 546}[replicas]
    orders = []
    for epoch in (0, 1):
        shards = [shard(dm, replicas, r, epoch) for r in range(replicas)]
        assert len({len(s) for s in shards}) == 1  # equal batch counts: no rank waits for another
        assert min(len(b) for s in shards for b in s) >= 2
        order = epoch_order(dm.train_rows, {}, 0.0, 5, epoch)[:n]
        # one step's batches of all ranks are replicas x batch_size consecutive rows of the shared permutation
        step = replicas * batch_size
        steps = [sorted(r for s in shards for r in s[k]) for k in range(len(shards[0]))]
        assert steps == [sorted(order[k : k + step].tolist()) for k in range(0, n, step)]
        rows = [r for s in shards for b in s for r in b]
        assert len(rows) == len(set(rows)) == n  # disjoint shards, each row once
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled per epoch, on every rank alike

    # rank 1, resumed after 2 batches of epoch 1, continues its own shard there
    full = shard(dm, replicas, 1, 1)
    state = rank_of(dm, replicas, 1, epoch=1, processed=2).train_dataloader().state_dict()
    resumed = rank_of(dm, replicas, 1).train_dataloader()
    resumed.load_state_dict(state)
    assert [b[2].tolist() for b in resumed] == full[2:]


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_validation_and_test_are_shared_among_ranks_without_padding(breast_npz, loader):
    dm = ClassificationData(str(breast_npz), image_size=28, eval_batch_size=16, loader=loader, num_workers=0)
    dm.setup()
    for split, make in (("val", "val_dataloader"), ("test", "test_dataloader")):
        parts = [[r for b in getattr(rank_of(dm, 2, k), make)() for r in b[2].tolist()] for k in (0, 1)]
        assert abs(len(parts[0]) - len(parts[1])) <= 1
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == dm._rows(split).tolist()


def test_the_dataloader_path_refuses_lightnings_distributed_sampler(breast_npz):
    for loader in ("dataloader", "memory"):
        dm = ClassificationData(str(breast_npz), image_size=28, loader=loader, num_workers=0)
        dm.setup()
        rank_of(dm, 2, 0, use_distributed_sampler=True)
        if loader == "dataloader":  # Lightning would shard the shards again
            with pytest.raises(ValueError, match="use_distributed_sampler=False"):
                dm.train_dataloader()
        else:  # the in-memory batches are no DataLoader: Lightning leaves them alone
            assert len(dm.train_dataloader()) == 5


@pytest.mark.slow  # two real `synaug` processes (gloo on the CPU): their imports dominate
def test_synaug_fit_ddp_on_two_cpu_processes(breast_npz, tmp_path):
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "ROWS_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "helpers")]),
    }
    data = ["--data.root", str(breast_npz), "--data.image_size", "28", "--data.batch_size", "64"]
    args = ["fit", "--model", "synaug.classifiers.ImageClassifier", "--model.backbone", "basic_cnn", *data]
    args += ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    args += ["--trainer.callbacks+=ddp_rows.RecordRows", "--trainer.logger.init_args.experiment_name", "ddp"]
    # every epoch's weights kept (Lightning's last.ckpt follows the best one), the best tested after fit
    args += [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.save_top_k=-1",
    ]
    args += [
        "--trainer.callbacks.monitor=val/f1_macro",
        "--trainer.callbacks.mode=max",
        "--trainer.callbacks.save_last=true",
    ]
    done = subprocess.run(
        [str(SYNAUG), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[
        -3000:
    ]  # rank 1 too (its failure may not reach rank 0)

    dm = ClassificationData(str(breast_npz), image_size=28, batch_size=64)
    dm.setup()
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key, rows in [("train/0", dm.train_rows), ("train/1", dm.train_rows)] + [
        (k, dm._rows(s)) for k, s in (("val/0", "val"), ("val/1", "val"), ("test", "test"))
    ]:
        a, b = seen[0][key], seen[1][key]
        assert not set(a) & set(b), key  # disjoint shards
        assert sorted(a + b) == sorted(rows.tolist()), key  # together the whole set, each image once
    assert seen[0]["train/0"] != seen[0]["train/1"]  # a new permutation each epoch

    # the logged metrics are the whole split's: a single-process evaluation of the same weights gives them
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    (folder,) = {p.parent for p in tmp_path.glob("outputs/**/last.ckpt")}
    state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
    (best,) = [v["best_model_path"] for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint")]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    logged = {
        epoch: {k: run.data.metrics[k] for k in run.data.metrics if k.startswith("val/")} for epoch in (0, 1)
    }
    for k in logged[0]:
        history = sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
        assert len(history) == 2, k  # one value an epoch
        for epoch, m in enumerate(history):
            logged[epoch][k] = m.value
    logged["test"] = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    runs = [(e, "validate", next(folder.glob(f"epoch={e}-*.ckpt"))) for e in (0, 1)]
    for key, verb, ckpt in [*runs, ("test", "test", tmp_path / best)]:
        (single,) = getattr(trainer, verb)(load_classifier(ckpt), datamodule=dm, verbose=False)
        assert single.keys() == logged[key].keys()
        for k, v in single.items():
            assert logged[key][k] == pytest.approx(v, rel=1e-5, nan_ok=True), (key, k)


def test_a_resumed_run_is_continued_by_rank_0_only(monkeypatch):
    # Every DDP rank builds the logger of a resumed fit (`--ckpt_path`): the other ranks must neither reopen the
    # run under their own process id nor read it (their experiment is Lightning's dummy).
    from lightning.pytorch.utilities import rank_zero_only

    from synaug.tracking import MLFlowLogger

    first = MLFlowLogger(experiment_name="ddp-resume")
    run_id = first.run_id
    first.finalize("success")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    rank1 = MLFlowLogger(experiment_name="ddp-resume", run_id=run_id)
    rank1.log_hyperparams({"lr": 0.1})
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and not run.data.params  # not reopened (RUNNING), nothing logged
