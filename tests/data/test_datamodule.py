import numpy as np
import pytest
import torch

from synaug.data import ClassificationData
from synaug.data.transforms import BatchAugment


def _batches(loader):
    return [tuple(t.clone() if torch.is_tensor(t) else torch.as_tensor(t) for t in b) for b in loader]


def test_memory_and_dataloader_paths_give_the_same_data(breast_npz):
    kw = dict(root=str(breast_npz), image_size=28, batch_size=32, seed=3)
    mem = ClassificationData(**kw, loader="memory")
    dl = ClassificationData(**kw, loader="dataloader", num_workers=0)
    mem.setup(), dl.setup()
    assert mem.in_memory and not dl.in_memory
    for a, b in zip(_batches(mem.test_dataloader()), _batches(dl.test_dataloader()), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # the same rows, in the same seeded order, in the first training epoch
    rows_mem = torch.cat([b[2] for b in mem.train_dataloader()])
    rows_dl = torch.cat([b[2] for b in dl.train_dataloader()])
    assert torch.equal(rows_mem, rows_dl) and len(set(rows_mem.tolist())) == len(mem.train_rows)


def test_each_epoch_reshuffles_and_batches_become_floats(breast_npz):
    dm = ClassificationData(str(breast_npz), image_size=28, batch_size=64)
    dm.setup()
    loader = dm.train_dataloader()
    first, second = (torch.cat([b[2] for b in loader]) for _ in range(2))
    assert not torch.equal(first, second) and sorted(first.tolist()) == sorted(second.tolist())
    x, y, row = dm.on_after_batch_transfer(next(iter(loader)), 0)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1 and x.shape[1:] == (1, 28, 28)


def test_real_fraction_resamples_per_subset_seed(breast_npz):
    def ids(**kw):
        dm = ClassificationData(str(breast_npz), image_size=28, real_fraction=0.1, **kw)
        dm.setup()
        return set(dm.train_ids), dm

    a, dm = ids(seed=0)
    b, _ = ids(seed=1)
    c, _ = ids(seed=1, subset_seed=0)
    assert a != b and a == c
    assert dm.counts["real_kept"].tolist() == [round(0.1 * 147), round(0.1 * 399)]
    assert len(dm._rows("val")) + len(dm._rows("test")) == 78 + 156 - dm.dropped_twins


def test_hflip_is_drawn_per_image_and_policies_keep_dtype():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(400, 1, 1, 1)
    flipped = (BatchAugment("hflip")(x) != x).flatten(1).any(1).float().mean()
    assert 0.4 < flipped < 0.6  # one draw per batch would give 0 or 1
    for policy in ("autoaugment", "randaugment", "trivialaugment"):
        out = BatchAugment(policy)(x[:32])
        assert out.dtype == torch.uint8 and out.shape == (32, 1, 4, 4)


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_selection_manifest_restricts_training(breast_npz, tmp_path, on_bad):
    full = ClassificationData(str(breast_npz), image_size=28)
    full.setup()
    chosen = np.array(full.train_ids)[::10]
    (tmp_path / "sel.csv").write_text("id,cluster\n" + "\n".join(f"{i},0" for i in chosen))
    dm = ClassificationData(
        str(breast_npz), image_size=28, selection=str(tmp_path / "sel.csv"), on_bad_image=on_bad
    )
    dm.setup()
    assert sorted(dm.train_ids) == sorted(chosen)


def test_resume_from_a_checkpoint_trains_as_an_uninterrupted_run(breast_npz, tmp_path):
    # Each epoch's order and augmentation must come from (seed, epoch, batch), not from state that a checkpoint
    # drops (a sampler's own epoch counter, the global RNG): otherwise a resumed run trains on other batches.
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from synaug.classifiers import ImageClassifier

    def fit(epochs, root, ckpt_path=None):
        L.seed_everything(0)
        dm = ClassificationData(
            str(breast_npz), image_size=28, batch_size=64, policy="hflip", real_fraction=0.3
        )
        model = ImageClassifier("basic_cnn", 2, in_chans=1, image_size=28)
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
        trainer = L.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            limit_val_batches=0,
            callbacks=[checkpoint],
        )
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return checkpoint.last_model_path, model

    last, _ = fit(1, tmp_path / "a")
    _, resumed = fit(3, tmp_path / "a", ckpt_path=last)
    _, straight = fit(3, tmp_path / "b")
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_last_training_batch_of_one_image_is_left_out(breast_npz):
    # Batch norm cannot train on a batch of one; 0.05 of BreastMNIST's training images gives 7 + 20 = 27 = 2 x 13 + 1.
    dm = ClassificationData(str(breast_npz), image_size=28, batch_size=13, real_fraction=0.05)
    dm.setup()
    assert len(dm.train_rows) == 27
    sizes = [len(b[2]) for b in dm.train_dataloader()]
    assert sizes == [13, 13]
    dm = ClassificationData(str(breast_npz), image_size=28, batch_size=10, real_fraction=0.05)
    dm.setup()
    assert [len(b[2]) for b in dm.train_dataloader()] == [10, 10, 7]


def test_the_run_is_tagged_with_its_near_twin_rate_and_any_provenance_override(breast_npz):
    from types import SimpleNamespace

    tags = {}
    experiment = SimpleNamespace(set_tag=lambda run, k, v: tags.__setitem__((run, k), v))
    dm = ClassificationData(
        str(breast_npz), image_size=28, near_twin_warn=0.01, allow_unrecorded_train_set=True
    )
    dm.trainer = SimpleNamespace(logger=SimpleNamespace(run_id="r1", experiment=experiment))
    dm.setup()
    assert (
        float(tags[("r1", "data/near_twin_rate")]) == pytest.approx(dm.near_twin_rate, abs=1e-4)
        and dm.near_twin_rate > 0.01
    )
    assert "supply groups" in tags[("r1", "data/near_twin_warning")]
    assert tags[("r1", "synthetic_unrecorded_train_set")] == "allowed"
    assert int(tags[("r1", "data/dropped_twins")]) == dm.dropped_twins > 0
