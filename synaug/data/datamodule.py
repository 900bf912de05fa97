"""One DataModule for every classifier and generator: a real source, optional synthetic sources mixed in per
class, validation and test always real.

Two loading paths give the same batches `(x, y, row)`: uint8 images, labels, and rows of `self.table`.
- memory: the whole table decoded once (cached on disk) into one uint8 tensor that lives on the training
  device; batches are gathered and augmented there. For the small datasets synaug is for, this removes the
  decode-and-copy work of a DataLoader from every epoch.
- dataloader: a DataLoader with workers, augmenting per image, for tables that do not fit.
After transfer to the device images become float in [0, 1]; models normalise for themselves.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from functools import cached_property
from typing import Literal

import lightning.pytorch as L
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset, Sampler

from synaug.cache import file_sha256
from synaug.data.images import load_image
from synaug.data.mixing import TrainingSet, epoch_order, plan
from synaug.data.sources import DataError, ImageSource, OnBad, decode_all, load_source
from synaug.data.synthetic import SyntheticSource, read_synthetic
from synaug.data.transforms import BatchAugment, Policy, policy_transform
from synaug.data.twins import NEAR_BITS, array_hash, distances, has_near_twin, source_hashes

log = logging.getLogger(__name__)


class ClassificationData(L.LightningDataModule):
    def __init__(
        self,
        root: str,
        image_size: int = 128,
        channels: Literal[1, 3] = 1,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        policy: Policy = "none",
        real_fraction: float | dict[str, float] = 1.0,
        real_count: dict[str, int] | None = None,
        synthetic: list[str] | None = None,
        synthetic_ratio: float | dict[str, float] = 0.0,
        augment_classes: list[str] | None = None,
        replace_prob: float = 0.0,
        seed: int = 0,
        subset_seed: int | None = None,
        selection: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        data_root: str | None = None,
        group_pattern: str | None = None,
        drop_test_twins: Literal["near", "exact", "none"] = "near",
        near_threshold: int = NEAR_BITS,
        near_twin_warn: float = 0.05,
        min_eval_per_class: int = 1,
        allow_unrecorded_train_set: bool = False,
        leak_bits: int = 0,
        on_bad_image: OnBad = "error",
        loader: Literal["auto", "memory", "dataloader"] = "auto",
        memory_budget_gb: float = 8.0,
        num_workers: int | None = None,
    ):
        """
        Args:
            root: an image folder (`root/<split>/<class>/*` or `root/<class>/*`), a MedMNIST `.npz` or a CSV
                manifest (`path,label[,split]`).
            image_size, channels: every image is converted to this (1 = grey, 3 = RGB) and size.
            policy: conventional augmentation of training images.
            real_fraction, real_count: per-class share (or exact number) of the real training images kept,
                drawn with `subset_seed` (default: `seed`). See `synaug.data.mixing` for the counting rules.
            synthetic: synthetic folders with a `manifest.csv` (see `synaug.data.synthetic`), pooled.
            synthetic_ratio: synthetic images added per class, as a fraction of that class's kept real count.
            augment_classes: only these classes get synthetic images (default: every class with a ratio).
            replace_prob: chance that a real training image is swapped for one of its synthetic variants each
                epoch (DA-Fusion style); needs image-conditioned synthetic images.
            selection: a selection manifest (`synaug sample`): train only on the images whose `id` it lists.
            val_fraction, test_fraction, split_seed: carving of missing splits (see `load_source`).
            data_root: the folder CSV manifest paths are relative to (default: the CSV's folder).
            group_pattern: a regular expression on file names naming each image's subject (patient), its first
                capture group; a CSV manifest names them in a `group` column. Carving keeps a group on one side.
            drop_test_twins: leave out validation/test images that have a twin in train (test: in train or
                validation): `near` (within `near_threshold` bits of perceptual hash, across classes; exact
                copies included), `exact` (same bytes) or `none`. The numbers left out are logged, and twins
                with different labels reported.
            near_threshold: perceptual-hash bits (of 256) within which two images are near twins.
            near_twin_warn: warn (and tag the MLflow run) when more than this share of the validation/test
                images, as split, have a near twin in train: images of one subject on both sides, most likely.
            min_eval_per_class: the fewest validation and test images a class may have (after twins are left
                out); fewer is an error, since its recall and F1 would be noise or undefined.
            allow_unrecorded_train_set: accept a learned generator's images whose manifest records no training
                set (so the leakage guard cannot check it); recorded as the run's tag
                `synthetic_unrecorded_train_set`.
            leak_bits: a synthetic image within this many perceptual-hash bits of a validation or test image (0:
                the same hash) is refused, as is one with identical decoded pixels.
            on_bad_image: `error` stops at the first unreadable image, naming it; `skip` leaves such images out
                and counts them (`skipped`).
            loader: `memory`, `dataloader`, or `auto` (memory when the decoded table fits `memory_budget_gb`).
            num_workers: DataLoader workers (default: all cores).
        """
        super().__init__()
        self.save_hyperparameters()
        self.table: pd.DataFrame | None = None

    # What the CLI links into models, known without decoding anything.
    @cached_property
    def source(self) -> ImageSource:
        h = self.hparams
        return load_source(
            h.root,
            val_fraction=h.val_fraction,
            test_fraction=h.test_fraction,
            seed=h.split_seed,
            data_root=h.data_root,
            group_pattern=h.group_pattern,
            near_threshold=h.near_threshold,
            on_bad_image=h.on_bad_image,
        )

    @property
    def class_names(self) -> list[str]:
        return list(self.source.classes)

    @property
    def num_classes(self) -> int:
        return len(self.source.classes)

    @property
    def channels(self) -> int:
        return self.hparams.channels

    @property
    def image_size(self) -> int:
        return self.hparams.image_size

    @cached_property
    def items(self) -> pd.DataFrame:
        """The source's table with this run's splits: validation/test twins of training images marked `twin`,
        training images outside `selection` marked `unselected`."""
        h = self.hparams
        items = self.source.items.copy()
        split, label = items["split"].to_numpy(), items["label"].to_numpy()
        hashes, ok = source_hashes(self.source)
        train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
        held = np.flatnonzero(np.isin(split, ["val", "test"]))
        # measured on the split as given or carved, before any twin is left out
        self.near_twin_rate = float(has_near_twin(hashes, held, train[ok[train]], h.near_threshold).mean())
        if self.near_twin_rate > h.near_twin_warn:
            log.warning(
                "%.0f%% of the validation/test images have a near twin in train (within %d bits of perceptual "
                "hash): images of one subject (patient) are likely on both sides of the split, which inflates "
                "every test metric. Supply groups: a `group` column in a CSV manifest, or data.group_pattern "
                "for a folder.",
                100 * self.near_twin_rate,
                h.near_threshold,
            )
        self.dropped_twins = 0
        if h.drop_test_twins != "none":
            if h.drop_test_twins == "exact":
                seen = lambda splits: items["sha256"].isin(items.loc[items["split"].isin(splits), "sha256"])  # noqa: E731
                twin = (
                    ((items["split"] == "val") & seen(["train"]))
                    | ((items["split"] == "test") & seen(["train", "val"]))
                ).to_numpy()
            else:
                twin = np.zeros(len(items), dtype=bool)
                for s, before in (("val", train), ("test", np.concatenate([train, val]))):
                    rows = np.flatnonzero((split == s) & ok)
                    twin[rows] = has_near_twin(hashes, rows, before[ok[before]], h.near_threshold)
            conflicts = self._label_conflicts(hashes, ok, np.flatnonzero(twin), np.concatenate([train, val]))
            self.dropped_twins = int(twin.sum())
            log.warning(
                "drop_test_twins=%s: left out %d validation and %d test image(s) with a twin in an earlier "
                "split; %d of them with a different label than their twin (label conflicts)",
                h.drop_test_twins,
                int((twin & (split == "val")).sum()),
                int((twin & (split == "test")).sum()),
                conflicts,
            )
            items.loc[twin, "split"] = "twin"
        self._check_eval_counts(items, label)
        if h.selection:
            ids = set(pd.read_csv(h.selection, dtype=str)["id"])
            unknown = ids - set(items["id"])
            if unknown:
                raise DataError(
                    f"selection {h.selection}: {len(unknown)} id(s) not in {h.root}, e.g. {min(unknown)}"
                )
            items.loc[(items["split"] == "train") & ~items["id"].isin(ids), "split"] = "unselected"
        return items

    def _label_conflicts(self, hashes, ok, twins: np.ndarray, earlier: np.ndarray) -> int:
        """How many of the `twins` have a twin in `earlier` with another label."""
        label = self.source.items["label"].to_numpy()
        earlier = earlier[ok[earlier]]
        if not len(twins) or not len(earlier):
            return 0
        near = distances(hashes[twins], hashes[earlier]) <= self.hparams.near_threshold
        sha = self.source.items["sha256"].to_numpy()
        near |= sha[twins][:, None] == sha[earlier][None, :]
        return int((near & (label[twins][:, None] != label[earlier][None, :])).any(axis=1).sum())

    def _check_eval_counts(self, items: pd.DataFrame, label: np.ndarray) -> None:
        """A class with fewer than `min_eval_per_class` validation or test images is an error, not a metric."""
        need = self.hparams.min_eval_per_class
        for s in ("val", "test"):
            counts = np.bincount(label[items["split"].to_numpy() == s], minlength=self.num_classes)
            short = {self.class_names[c]: int(n) for c, n in enumerate(counts) if n < need}
            if short:
                raise DataError(
                    f"{self.hparams.root}: class(es) with fewer than {need} {s} image(s) "
                    f"(min_eval_per_class): {short}. Add images of these classes, raise "
                    f"{'val' if s == 'val' else 'test'}_fraction when splits are carved, supply a {s} split, "
                    "or lower data.min_eval_per_class knowingly"
                )

    def training_set(self, **mixing) -> tuple[SyntheticSource | None, TrainingSet]:
        """The synthetic source and the training set `plan` chooses, decoding no image. `mixing` replaces this
        run's mixing settings (`real_fraction`, `synthetic`, `subset_seed`, ...): one DataModule checks the
        cells of a whole experiment grid before anything trains."""
        h = {**self.hparams, **mixing}
        syn = self._synthetic(h["synthetic"])
        keys = ("real_fraction", "real_count", "synthetic_ratio", "augment_classes", "replace_prob", "seed")
        ts = plan(
            self.items,
            self.class_names,
            syn,
            **{k: h[k] for k in keys},
            subset_seed=h["subset_seed"],
            allow_unrecorded_train_set=h["allow_unrecorded_train_set"],
        )
        return syn, ts

    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return
        items = self.items
        syn, ts = self.training_set()
        self.counts = ts.counts

        real_rows = np.concatenate(
            [ts.real, np.flatnonzero(items["split"] == "val"), np.flatnonzero(items["split"] == "test")]
        )
        real = items.iloc[real_rows][["id", "label", "split", "sha256"]].assign(
            synthetic=False, key=real_rows
        )
        parts = [real]
        if syn is not None:
            syn_rows = np.unique(np.concatenate([ts.synthetic, *ts.variants.values()]).astype(np.int64))
            s = syn.items.iloc[syn_rows]
            parts.append(
                pd.DataFrame(
                    {
                        "id": s["file"],
                        "label": s["label"],
                        "split": "train",
                        "synthetic": True,
                        "key": syn_rows,
                        "sha256": [_sha256(f) for f in s["file"]],
                    }
                )
            )
        table = pd.concat(parts, ignore_index=True)
        keep, self.images = self._load(table)
        self.skipped = [*self.source.missing, *table.loc[~keep, "id"].tolist()]
        table = table[keep].reset_index(drop=True)
        self.table = table  # `load_row` reads through it
        try:
            self._refuse_leaks(table)
        except DataError:
            self.table = None
            raise
        self._tag_run()

        row = {
            (bool(sy), int(k)): r
            for r, (sy, k) in enumerate(zip(table["synthetic"], table["key"], strict=True))
        }
        train_real = [row[(False, int(i))] for i in ts.real if (False, int(i)) in row]
        train_syn = [row[(True, int(i))] for i in ts.synthetic if (True, int(i)) in row]
        self.train_rows = np.array(train_real + train_syn, dtype=np.int64)
        self.variants = {
            row[(False, i)]: np.array([row[(True, int(j))] for j in v if (True, int(j)) in row])
            for i, v in ts.variants.items()
            if (False, i) in row
        }
        self.table = table
        self.train_ids = table.loc[self.train_rows[: len(train_real)], "id"].tolist()
        self.fingerprint = self.source.fingerprint
        self.train_fingerprint = hashlib.sha256(
            "\n".join(sorted(table.loc[self.train_rows, "sha256"])).encode()
        ).hexdigest()
        if self.skipped:
            log.warning("skipped %d unreadable image(s) (on_bad_image=skip)", len(self.skipped))
        log.info("training set per class:\n%s", self.counts.to_string())

    def _refuse_leaks(self, table: pd.DataFrame) -> None:
        """Refuse any synthetic image whose decoded pixels, or perceptual hash, equal a validation or test
        image's: declared provenance can be missing or wrong, the pixels cannot."""
        syn = np.flatnonzero(table["synthetic"].to_numpy())
        held = np.flatnonzero(table["split"].isin(["val", "test"]).to_numpy())
        if not len(syn):
            return
        pixels = {r: self.load_row(int(r)) for r in np.concatenate([syn, held])}
        digest = {r: hashlib.sha256(a.tobytes()).hexdigest() for r, a in pixels.items()}
        hashes = np.zeros((len(table), 4), dtype=np.uint64)
        for r, a in pixels.items():
            hashes[r] = array_hash(a)
        by_digest = {digest[r]: r for r in held}
        close = distances(hashes[syn], hashes[held]) <= self.hparams.leak_bits if len(held) else None
        for k, r in enumerate(syn):
            match = by_digest.get(digest[r])
            if match is None and close is not None and close[k].any():
                match = held[np.argmax(close[k])]
            if match is not None:
                raise DataError(
                    f"synthetic image {table.at[r, 'id']} matches {table.at[match, 'split']} image "
                    f"{table.at[match, 'id']} ({'pixel-identical' if digest[r] == digest[match] else 'same perceptual hash'}): "
                    "validation and test must stay unseen; remove it from the synthetic folder"
                )

    def _tag_run(self) -> None:
        """What a reader of the run must know about its data, as MLflow tags (when the run logs to MLflow)."""
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is None or not hasattr(logger, "run_id") or not hasattr(logger.experiment, "set_tag"):
            return
        tags = {
            "data/near_twin_rate": f"{self.near_twin_rate:.4f}",
            "data/dropped_twins": str(self.dropped_twins),
        }
        if self.near_twin_rate > self.hparams.near_twin_warn:
            tags["data/near_twin_warning"] = (
                f"{100 * self.near_twin_rate:.0f}% of validation/test images have a near twin in train; "
                "supply groups (CSV `group` column or data.group_pattern)"
            )
        if self.hparams.allow_unrecorded_train_set:
            tags["synthetic_unrecorded_train_set"] = "allowed"
        for k, v in tags.items():
            logger.experiment.set_tag(logger.run_id, k, v)

    def _synthetic(self, folders: list[str] | None) -> SyntheticSource | None:
        if not folders:
            return None
        sources = [read_synthetic(f, self.class_names) for f in folders]
        if len(sources) == 1:
            return sources[0]
        # Pool several folders into one source; file paths are absolute, so the folder only names train_sets.
        items = pd.concat([s.items.assign(_folder=str(s.folder)) for s in sources], ignore_index=True)
        pooled = SyntheticSource(sources[0].folder, items)
        pooled.train_ids = lambda fp: next(
            s.train_ids(fp) for s in sources if fp in set(s.items["train_set"])
        )
        return pooled

    def _load(self, table: pd.DataFrame) -> tuple[np.ndarray, torch.Tensor | None]:
        """Decode (memory path) or check (dataloader path) every image once; returns which rows are readable."""
        h = self.hparams
        size, ch, on_bad = h.image_size, h.channels, h.on_bad_image
        self.in_memory = h.loader == "memory" or (
            h.loader == "auto" and len(table) * ch * size**2 <= h.memory_budget_gb * 2**30
        )
        real = ~table["synthetic"].to_numpy()
        keys, files = table["key"][real].to_numpy(), table["id"][~real].tolist()
        load_real = lambda i: self.source.load(int(i), size, ch)  # noqa: E731
        load_syn = lambda f: load_image(f, size, ch)  # noqa: E731
        if self.in_memory:
            rx, rk = self.source.decode(keys, size, ch, on_bad)
            sx, sk = decode_all(load_syn, files, size, ch, on_bad)
        else:
            # Decode once without keeping the pixels, so that a bad file stops the run here, not in a worker.
            rx, rk = decode_all(lambda i: load_real(i)[:, :1, :1], keys, 1, ch, on_bad)
            sx, sk = decode_all(lambda f: load_syn(f)[:, :1, :1], files, 1, ch, on_bad)
        keep = np.zeros(len(table), dtype=bool)
        keep[real] = np.isin(keys, rk)
        keep[~real] = np.isin(files, sk)
        return keep, torch.cat([rx, sx]) if self.in_memory else None

    # ---- loaders ----
    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _device_images(self) -> torch.Tensor:
        if self.images.device != self._device():
            self.images = self.images.to(self._device())
            self._labels = None
        return self.images

    def _labels_on(self, device) -> torch.Tensor:
        if getattr(self, "_labels", None) is None or self._labels.device != device:
            self._labels = torch.tensor(self.table["label"].to_numpy(), device=device)
        return self._labels

    def _replicas(self) -> tuple[int, int]:
        """(ranks sharing the data, this one's rank): under DDP each rank iterates its own shard. Lightning's
        DistributedSampler cannot reach the in-memory batches (not a DataLoader), and on the dataloader path it
        would pad validation/test with repeated images, which the metrics would count twice."""
        kw = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if not kw or kw["num_replicas"] == 1:
            return 1, 0
        if not self.in_memory and self.trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "ClassificationData shards its own loaders across ranks: set the Trainer's "
                "use_distributed_sampler=False (`synaug fit` does), or Lightning shards the shards again"
            )
        return kw["num_replicas"], kw["rank"]

    def train_dataloader(self):
        h = self.hparams
        replicas, rank = self._replicas()
        n = epoch_length(len(self.train_rows), h.batch_size, replicas)

        def order(epoch: int) -> np.ndarray:
            # Every rank draws the same permutation (seed, epoch) and takes every `replicas`-th row of it from its
            # rank on, as DistributedSampler does: one step's batches on all ranks are `replicas * batch_size`
            # consecutive rows of the permutation, the ranks' shards together the epoch's rows, each once.
            return epoch_order(self.train_rows, self.variants, h.replace_prob, h.seed, epoch)[:n][
                rank::replicas
            ]

        def position() -> tuple[int, int]:  # (epoch, batches of it trained): what a checkpoint resumes from
            # current_epoch, not epoch_progress.processed: at on_train_epoch_end the latter already counts it
            return (
                self.trainer.current_epoch,
                self.trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            )

        if self.in_memory:
            images = self._device_images()
            return DeviceBatches(images, self._labels_on(images.device), order, h.batch_size, position)
        sampler = EpochSampler(order, len(range(rank, n, replicas)), position, h.batch_size)
        return self._dataloader(sampler, h.batch_size, policy_transform(h.policy), loader=ResumableLoader)

    def _rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.table["split"].to_numpy() == split)

    def _eval(self, rows: np.ndarray):
        replicas, rank = self._replicas()
        if len(rows) < replicas:
            # a rank without a batch would never join the gathering of the metrics' states
            raise DataError(f"{len(rows)} evaluation image(s) cannot be shared by {replicas} ranks")
        # Neither padded nor dropped (the batch counts of ranks may differ by one, which evaluation allows): the
        # metrics gather their states over the ranks, so every image of the split counts once.
        rows = rows[rank::replicas]
        if self.in_memory:
            images = self._device_images()
            return DeviceBatches(
                images, self._labels_on(images.device), lambda _: rows, self.hparams.eval_batch_size
            )
        return self._dataloader(rows, self.hparams.eval_batch_size)

    def val_dataloader(self):
        return self._eval(self._rows("val"))

    def test_dataloader(self):
        return self._eval(self._rows("test"))

    def predict_dataloader(self):
        return self.test_dataloader()

    def _dataloader(self, sampler, batch_size, transform=None, loader=DataLoader) -> DataLoader:
        workers = os.cpu_count() if self.hparams.num_workers is None else self.hparams.num_workers
        ds = self._dataset(transform)
        return loader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y, row = batch
        if self.trainer is not None and self.trainer.training and self.in_memory:
            # Seeded by (seed, epoch, batch), not the global RNG that a checkpoint does not hold: a resumed run
            # augments as an uninterrupted one, and model code drawing random numbers changes no augmentation.
            batch = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
            key = (self.hparams.seed, self.trainer.current_epoch, batch)
            # under DDP each rank draws its own augmentations (rank 0 those of a single process)
            key += (rank,) if (rank := self._replicas()[1]) else ()
            x = self.augment(x, seed=hash(key) % 2**63)
        return x.float().div_(255), y, row

    @cached_property
    def augment(self) -> BatchAugment:
        return BatchAugment(self.hparams.policy)

    def load_row(self, r: int) -> np.ndarray:
        """Row `r` of the table as (channels, size, size) uint8, from memory or from disk."""
        return self.images[r].cpu().numpy() if self.in_memory else self._dataset().load(r)

    def _dataset(self, transform=None) -> TableDataset:
        return TableDataset(
            self.source, self.table, self.hparams.image_size, self.hparams.channels, transform
        )

    def preview_image(self, n: int = 32, seed: int = 0, cell: int = 96) -> Image.Image:
        """A grid of training images, half synthetic where there are any, each captioned real/synthetic + class
        (synthetic in red), `cell` px a tile. Drawn with PIL, not matplotlib: every run logs one, and a
        matplotlib figure of 32 images cost 0.4 s to draw and save (this: about 0.02 s)."""
        rng = np.random.default_rng(seed)
        syn = self.table.loc[self.train_rows, "synthetic"].to_numpy()
        pick_s = rng.permutation(self.train_rows[syn])[: n // 2]
        pick_r = rng.permutation(self.train_rows[~syn])[: n - len(pick_s)]
        rows = np.concatenate([pick_r, pick_s])
        cols, pad, caption = 8, 6, 28
        lines = math.ceil(len(rows) / cols)
        canvas = Image.new("RGB", (cols * (cell + pad) + pad, lines * (cell + caption + pad) + pad), "white")
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=11)
        for k, r in enumerate(rows):
            y, x = divmod(k, cols)
            left, top = pad + x * (cell + pad), pad + y * (cell + caption + pad)
            img = self.load_row(int(r))
            img = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
            canvas.paste(
                img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (left, top + caption)
            )
            synthetic = bool(self.table.at[r, "synthetic"])
            draw.multiline_text(
                (left + cell // 2, top),
                f"{'synthetic' if synthetic else 'real'}\n{self.class_names[self.table.at[r, 'label']]}",
                fill="#d62728" if synthetic else "black",
                font=font,
                anchor="ma",
                align="center",
                spacing=2,
            )
        return canvas


def epoch_length(n: int, batch_size: int, replicas: int = 1) -> int:
    """How many rows of an epoch's order of `n` are trained on, by all `replicas` ranks together. A step takes
    `replicas * batch_size` rows, a batch each rank; a last step that would give a rank a batch of one image
    (batch norm cannot train on it) or none (its DDP peers would wait for it forever) is dropped: fewer than two
    images a rank, a different few each epoch. Never padded: no image is seen twice in an epoch."""
    last = n % (replicas * batch_size)
    return n - last if last < 2 * replicas else n


class DeviceBatches:
    """Batches gathered from a uint8 tensor already on the device, in the order its `sampler` gives."""

    batch_sampler = None  # read by Lightning beside `sampler`, as on a DataLoader

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, order, batch_size: int, position=None):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        # Lightning calls `sampler.set_epoch` on whatever it iterates: a resumed run continues the epochs' orders.
        self.sampler = EpochSampler(order, len(order(0)), position, batch_size)

    # Lightning keeps the state of a loader that has these in the checkpoint (`fit_loop.combined_loader`) and
    # gives it back on resume, before the first batch: a run resumed mid-epoch continues that epoch's order.
    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        rows = torch.as_tensor(list(self.sampler), device=self.images.device)
        for b in rows.split(self.batch_size):
            yield self.images[b], self.labels[b], b


class EpochSampler(Sampler[int]):
    """The rows of epoch `epoch` by `order(epoch)`. Lightning sets the epoch (`set_epoch`), so a run resumed from
    a checkpoint sees the orders an uninterrupted run would; iterated by hand, each pass is the next epoch.

    Resumable: `state_dict()` is the training position (`position()`: epoch and batches of it done) as rows;
    after `load_state_dict` the next pass starts there, mid-epoch or at the next epoch's start. Lightning draws
    the first batch of a resumed run before it sets the epoch, so the epoch must come from the state."""

    def __init__(self, order, n: int, position=None, batch_size: int = 1):
        self.order, self.n, self.epoch, self.skip = order, n, 0, 0
        self.position, self.batch_size = position, batch_size

    def state_dict(self) -> dict:
        epoch, batches = self.position()
        return {"epoch": epoch, "rows": batches * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        done = state["rows"] >= self.n
        self.epoch, self.skip = state["epoch"] + done, 0 if done else state["rows"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rows = self.order(self.epoch)[self.skip :]
        self.epoch, self.skip = self.epoch + 1, 0
        return iter(rows.tolist())


class ResumableLoader(DataLoader):
    """A DataLoader over an EpochSampler whose position travels in the checkpoint (see EpochSampler)."""

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class TableDataset(Dataset):
    """Rows of the data table read from disk; holds only what a worker needs (not the DataModule, whose
    trainer would otherwise be pickled into every worker under the spawn start method)."""

    def __init__(
        self, source: ImageSource, table: pd.DataFrame, image_size: int, channels: int, transform=None
    ):
        self.source, self.size, self.channels, self.transform = source, image_size, channels, transform
        self.ids, self.keys = table["id"].tolist(), table["key"].to_numpy()
        self.synthetic, self.labels = table["synthetic"].to_numpy(), table["label"].to_numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, r: int) -> np.ndarray:
        if self.synthetic[r]:
            return load_image(self.ids[r], self.size, self.channels)
        return self.source.load(int(self.keys[r]), self.size, self.channels)

    def __getitem__(self, r: int):
        x = torch.from_numpy(self.load(r))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[r]), r


def _sha256(path: str) -> str:
    try:
        return file_sha256(path)
    except FileNotFoundError:  # decoding names it (or skips it, with `on_bad_image: skip`)
        return ""
