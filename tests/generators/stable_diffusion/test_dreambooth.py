"""DreamBooth (LoRA, full) and textual inversion on a tiny Stable Diffusion pipeline built in code."""

import json
import shutil

import mlflow
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers.sd_dummy import (
    save_dummy_sdxl_pipeline,
)  # tests/ is on sys.path (pytest rootdir-less import)
from helpers.toy import toy_data, trainer  # tests/ is on sys.path (pytest rootdir-less import)
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from synaug.data.synthetic import image_seed, read_synthetic, train_set_fingerprint
from synaug.generators.diffusion.network import inference_scheduler
from synaug.generators.generate import generate
from synaug.generators.stable_diffusion.dreambooth import (
    DreamBooth,
    load_dreambooth,
    sample_pipeline,
)
from synaug.generators.stable_diffusion.pipeline import load_pipeline
from synaug.tracking import MLFlowLogger

CLASSES = ["glioma", "meningioma"]


def module(tiny, **kw) -> DreamBooth:
    torch.manual_seed(0)
    args = dict(
        num_classes=2,
        in_chans=1,
        image_size=16,
        class_names=CLASSES,
        model=tiny,
        resolution=32,
        lr=1e-2,
        noun="brain MRI",
        validation_steps=2,
        validation_per_class=1,
        class_image_steps=2,
    )
    return DreamBooth(**{**args, **kw})


def images(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], steps: int) -> torch.Tensor:
    """Sample as `DreamBooth.sample` does: DPM-Solver++ over the pipeline's schedule, CPU noise per seed."""
    pipe.scheduler = inference_scheduler("dpm++", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return sample_pipeline(pipe, prompts, seeds, steps, guidance_scale=7.5, resolution=32)


def fixed_loss(m: DreamBooth, data: TensorDataset) -> float:
    """The loss of the whole toy batch at fixed noise and timesteps (seed 0), averaged over 8 draws."""
    x, y, _ = data.tensors
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return sum(m.losses(x, y, g)["loss"].item() for _ in range(8)) / 8


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    """LoRA (alpha != rank) overfitting one batch for 20 steps, with MLflow validation grids every 10.

    The tiny UNet has attention at one 8-channel level only: adapters on the attention projections alone barely
    move its loss, so this run also adapts the input and output convolutions."""
    tmp = tmp_path_factory.mktemp("lora")
    data = toy_data(4)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv_out")
    m = module(tiny, rank=4, lora_alpha=8, target_modules=targets, lr=3e-2, validation_every=10)
    before = fixed_loss(m, data)
    logger = MLFlowLogger(experiment_name="test-dreambooth")
    t = trainer(
        tmp,
        20,
        logger=logger,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(every_n_train_steps=20)],
        log_every_n_steps=5,
    )
    t.fit(m, train_dataloaders=DataLoader(data, batch_size=4))
    return m, before, fixed_loss(m, data), logger, t


def test_lora_training_lowers_the_loss(lora_run):
    _, before, after, _, _ = lora_run
    assert after < 0.8 * before, (before, after)


def test_lora_export_reloads_into_a_fresh_pipeline_with_the_same_output(lora_run, tiny):
    m, _, _, logger, _ = lora_run
    export = m.export_dir()
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    assert not list(export.rglob("diffusion_pytorch_model*"))  # adapters only, no copy of the base UNet
    meta = json.loads((export / "generator.json").read_text())
    assert (
        meta["kind"] == "dreambooth"
        and meta["method"] == "lora"
        and meta["run_id"] == logger.run_id
        and meta["classes"] == CLASSES
    )
    assert meta["prompts"]["glioma"] == "an image of a glioma brain MRI"

    prompts, seeds = [m.prompts["glioma"], m.prompts["meningioma"]], [3, 4]
    trained = m.sample(prompts, seeds, steps=3)
    fresh = load_pipeline(tiny)
    base = images(fresh, prompts, seeds, 3)
    fresh.load_lora_weights(export)
    reloaded = images(fresh, prompts, seeds, 3)
    assert not torch.equal(base, trained)  # the adapters change the images ...
    assert (reloaded.int() - trained.int()).abs().max() <= 1  # ... and reload with their alpha/rank scale


def test_checkpoint_holds_only_the_adapters(lora_run):
    m, _, _, _, t = lora_run
    ckpt = torch.load(t.checkpoint_callback.best_model_path, weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys == set(m.trained_names()) and len(keys) == 2 * (
        32 + 2
    )  # A and B of 32 attention projections + 2 convs
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    full = m.state_dict()
    assert sum(full[k].numel() for k in keys) < 0.1 * sum(v.numel() for v in full.values())
    # ... and restores onto the base model named in the hyperparameters.
    again = DreamBooth.load_from_checkpoint(t.checkpoint_callback.best_model_path, weights_only=True)
    for k in keys:
        assert torch.equal(again.state_dict()[k], full[k])
    assert again.run_id == m.run_id


def test_validation_grids_go_to_mlflow(lora_run):
    _, _, _, logger, _ = lora_run
    client = mlflow.MlflowClient(logger._tracking_uri)
    grids = [f.path for f in client.list_artifacts(logger.run_id, "validation")]
    assert grids == ["validation/step_0000010.png", "validation/step_0000020.png"]
    assert client.get_metric_history(logger.run_id, "train/loss")


def test_resume_from_checkpoint_equals_uninterrupted_run(tiny, tmp_path):
    data = DataLoader(toy_data(4), batch_size=2)  # 2 batches an epoch; the checkpoint falls on a boundary
    every2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    kw = dict(lr_schedule="cosine", snr_gamma=5.0)
    full = module(tiny, **kw)
    trainer(tmp_path, 4, callbacks=[every2], enable_checkpointing=True).fit(full, train_dataloaders=data)
    torch.manual_seed(123)  # another LoRA init and global RNG state: the checkpoint must restore everything
    resumed = DreamBooth(**full.hparams)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    trainer(tmp_path, 4).fit(resumed, train_dataloaders=data, ckpt_path=ckpt)
    a, b = resumed.state_dict(), full.state_dict()
    assert resumed.global_step == 4
    for k in full.trained_names():
        assert torch.equal(a[k], b[k]), k


def test_prior_preservation_batch_holds_instance_and_class_images_in_proportion(tiny, tmp_path):
    folder = tmp_path / "class_images"
    m = module(tiny, prior_preservation=True, prior_ratio=0.5, num_class_images=3, class_images=str(folder))
    trainer(tmp_path, 2).fit(m, train_dataloaders=DataLoader(toy_data(4), batch_size=4))
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert m.class_pixels.shape == (3, 3, 32, 32)

    x, y, _ = toy_data(4).tensors
    pixels, ids = m.model_inputs(x, y, torch.Generator().manual_seed(0))
    assert pixels.shape == (4 + 2, 3, 32, 32)
    assert torch.equal(ids[:4], m.prompt_ids[y]) and (ids[4:] == m.class_prompt_ids).all()
    class_images = m.class_pixels.float() / 127.5 - 1
    for p in pixels[4:]:
        assert any(torch.allclose(p, c) for c in class_images)
    assert m.tokenizer.decode(m.class_prompt_ids[0], skip_special_tokens=True) == "an image of a brain mri"
    losses = m.losses(x, y, torch.Generator().manual_seed(0))
    assert torch.allclose(losses["loss"], losses["instance"] + losses["prior"])
    # A folder that holds enough class images is used as it is.
    stamp = [p.stat().st_mtime_ns for p in sorted(folder.iterdir())]
    m.class_images()
    assert [p.stat().st_mtime_ns for p in sorted(folder.iterdir())] == stamp


def test_textual_inversion_trains_only_the_new_rows(tiny, tmp_path):
    m = module(tiny, method="textual_inversion", lr=5e-2, weight_decay=0.0, classes=["glioma"])
    emb = m.text_encoder.get_input_embeddings()
    assert m.trained_names() == ["text_encoder.embeddings.token_embedding.new"]
    frozen = {k: v.clone() for k, v in m.state_dict().items() if not k.endswith("token_embedding.new")}
    new = emb.new.detach().clone()
    data = TensorDataset(*[t[::2] for t in toy_data(4).tensors])  # glioma images only
    t = trainer(tmp_path, 3)
    t.fit(m, train_dataloaders=DataLoader(data, batch_size=2))
    for k, v in m.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k  # base vocabulary, UNet, VAE untouched
    assert not torch.equal(emb.new[0], new[0])  # the glioma token's row trained ...
    assert torch.equal(emb.new[1], new[1])  # ... the unused meningioma row did not

    export = m.save_pretrained(tmp_path / "export")
    saved = load_file(export / "textual_inversion" / "glioma" / "learned_embeds.safetensors")
    assert list(saved) == ["<glioma>"] and torch.equal(saved["<glioma>"][0], emb.new[0].detach())
    assert not (export / "textual_inversion" / "meningioma").exists()  # only learned classes are exported
    pipe, meta = load_dreambooth(export)
    assert meta.info["classes"] == ["glioma"]
    assert meta.info["prompts"] == {"glioma": "an image of a <glioma> brain MRI"}
    prompt = [m.prompts["glioma"]]
    ours = m.sample(prompt, [7], steps=2)
    theirs = images(pipe, prompt, [7], 2)
    assert (ours.int() - theirs.int()).abs().max() <= 1


def test_full_finetune_checkpoint_holds_the_unet_only(tiny, tmp_path):
    m = module(tiny, method="full", lr=1e-3)
    trainer(tmp_path, 1, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path / "c")]).fit(
        m, train_dataloaders=DataLoader(toy_data(4), batch_size=4)
    )
    keys = set(torch.load(next((tmp_path / "c").glob("*.ckpt")), weights_only=True)["state_dict"])
    assert keys == {f"unet.{k}" for k, _ in m.unet.named_parameters()}
    export = m.save_pretrained(tmp_path / "export")
    assert (export / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (export / "vae").exists() and not (export / "text_encoder").exists()
    pipe, _ = load_dreambooth(export)
    for (k, a), b in zip(pipe.unet.state_dict().items(), m.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_generate_from_an_export_writes_provenance(lora_run, tmp_path):
    m, _, _, logger, _ = lora_run
    m.train_ids = ["train/glioma/1.png", "train/meningioma/1.png"]
    export = m.save_pretrained(tmp_path / "export")
    out = generate(str(export), str(tmp_path / "syn"), per_class=2, sampler=dict(steps=2), device="cpu")
    items = read_synthetic(out, CLASSES).items
    assert sorted(items["path"]) == [f"{c}/{k:06d}.png" for c in CLASSES for k in range(2)]
    assert set(items["generator"]) == {"sd-lora"} and set(items["run_id"]) == {logger.run_id}
    assert set(items["train_set"]) == {train_set_fingerprint(m.train_ids)}
    assert set(items["checkpoint"]) == {load_dreambooth(export)[1].checkpoint}
    assert [int(s) for s in items["seed"]] == [image_seed(0, c, k) for c in CLASSES for k in range(2)]
    with pytest.raises(ValueError, match="holds images generated with"):
        generate(str(export), str(out), per_class=2, sampler=dict(steps=3), device="cpu")

    # An export written before the one metadata schema (DreamBoothMeta's dreambooth.json) still loads and
    # makes the same images.
    old = tmp_path / "old_export"
    shutil.copytree(export, old)
    info = json.loads((old / "generator.json").read_text())
    del info["kind"], info["module"]
    info["resolution"] = info.pop("image_size")
    (old / "dreambooth.json").write_text(json.dumps(info))
    (old / "generator.json").unlink()
    _, meta = load_dreambooth(old)
    assert (meta.kind, meta.image_size, meta.info["classes"]) == ("dreambooth", m.hparams.resolution, CLASSES)
    again = generate(str(old), str(tmp_path / "syn_old"), per_class=2, sampler=dict(steps=2), device="cpu")
    for p in sorted(items["path"]):
        assert (again / p).read_bytes() == (out / p).read_bytes()


def test_sdxl_lora_with_both_text_encoders_reloads_with_the_same_output(tmp_path):
    tiny_xl = str(save_dummy_sdxl_pipeline(tmp_path))
    m = module(tiny_xl, train_text_encoder=True, lr=3e-2)
    assert {n.split(".")[0] for n in m.trained_names()} == {"unet", "text_encoder", "text_encoder_2"}
    trainer(tmp_path, 2).fit(m, train_dataloaders=DataLoader(toy_data(4), batch_size=4))
    export = m.save_pretrained(tmp_path / "export")
    assert [p.name for p in export.glob("*.safetensors")] == ["pytorch_lora_weights.safetensors"]

    prompts, seeds = [m.prompts["glioma"]], [5]
    trained = m.sample(prompts, seeds, steps=2)
    fresh = load_pipeline(tiny_xl)
    base = images(fresh, prompts, seeds, 2)
    pipe, _ = load_dreambooth(export)
    reloaded = images(pipe, prompts, seeds, 2)
    assert not torch.equal(base, trained)
    assert (reloaded.int() - trained.int()).abs().max() <= 1


def test_bad_configurations_are_errors(tiny):
    with pytest.raises(ValueError, match="neither prior_preservation"):
        module(tiny, method="textual_inversion", prior_preservation=True)
    with pytest.raises(ValueError, match="each a different one"):
        module(tiny, identifiers={"glioma": "sks", "meningioma": "sks"})
    with pytest.raises(ValueError, match="already in the vocabulary"):
        module(tiny, method="textual_inversion", identifiers={"glioma": "a", "meningioma": "<m>"})
    m = module(tiny, classes=["glioma"])
    m.learns = torch.tensor([True, False])
    with pytest.raises(ValueError, match=r"holds class\(es\) \['meningioma'\]"):
        m.training_step(toy_data(4).tensors, 0)
    assert isinstance(load_pipeline(tiny), StableDiffusionPipeline)


def test_sdxl_takes_lora_only(tmp_path):
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline; full here supports SD 1.x/2.x"):
        module(str(save_dummy_sdxl_pipeline(tmp_path)), method="full")
