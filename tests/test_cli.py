"""`synaug fit/test` end to end: the shipped configs, MLflow provenance, and config typos; the light entry point."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from synaug import cli
from synaug.cli import COMMANDS, SynAugCLI, main, respell

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "classifiers").glob("*.yaml"))


def _small(npz) -> list[str]:
    return [
        "--data.root",
        str(npz),
        "--data.image_size",
        "32",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ]


def test_the_six_thesis_classifiers_ship_a_config_each():
    # A subset: adding a classifier is adding a YAML file, which every test below then picks up.
    assert {"ffnn", "svc", "logreg", "basic_cnn", "resnet18", "vit"} <= {c.stem for c in CONFIGS}


def test_generator_configs_need_no_classifier_switches(breast_npz):
    # The CLI knows a generator: no test pass after fit, no validation loop, without saying so in the YAML.
    config = Path(__file__).parents[1] / "configs" / "generators" / "pggan_tiny.yaml"
    assert "test_after_fit" not in config.read_text() and "limit_val_batches" not in config.read_text()
    cli = SynAugCLI(args=["-c", str(config), "--data.root", str(breast_npz)], run=False)
    assert cli.config.test_after_fit is False and cli.trainer.limit_val_batches == 0
    classifier = SynAugCLI(args=["-c", str(CONFIGS[0]), *_small(breast_npz)], run=False)
    assert classifier.config.test_after_fit is True


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_every_classifier_config_instantiates(config, breast_npz):
    extra = ["--model.init_args.model_kwargs", "{img_size: 32}"] if config.stem == "vit" else []
    cli = SynAugCLI(args=["-c", str(config), *_small(breast_npz), *extra], run=False)
    assert cli.model.hparams.num_classes == 2 and cli.model.hparams.in_chans == 1  # linked from the data
    assert cli.model.hparams.class_names == ["malignant", "normal_benign"]


def _runs(experiment: str):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_fit_logs_config_commit_fingerprint_metrics_and_images(breast_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    main(
        [
            "fit",
            "-c",
            str(CONFIGS[0].parent / "basic_cnn.yaml"),
            *_small(breast_npz),
            "--trainer.logger.init_args.experiment_name",
            "cli-test",
            "--trainer.logger.init_args.system_metrics",
            "true",
        ]
    )
    client, runs = _runs("cli-test")
    run = runs[-1]
    assert {
        "train/loss_epoch",
        "val/f1_macro",
        "val/acc",
        "test/acc",
        "test/f1_macro",
        "test/cross_entropy",
        "test/recall/malignant",
        "test/auroc",
    } <= set(run.data.metrics)
    assert run.data.tags["data.fingerprint"] and run.data.tags["git_commit"]
    assert "system/cpu_utilization_percentage" in run.data.metrics  # asked for with system_metrics
    assert run.data.params["backbone"] == "basic_cnn" and run.data.params["image_size"] == "32"
    # the optimizer and trainer settings, which the module's own hyperparameters leave out
    assert run.data.params["optimizer"] == "Adam" and float(run.data.params["optimizer.lr"]) > 0
    assert run.data.params["trainer.max_epochs"] == "1" and run.data.params["trainer.precision"] == "32-true"
    assert run.info.run_name == "basic_cnn-32px-hflip"  # from its settings, not fixed by the config
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"breastmnist.npz-train", "breastmnist.npz-validation", "breastmnist.npz-test"}
    train = inputs["breastmnist.npz-train"]
    assert [t.value for t in train.tags] == ["train"]
    assert train.dataset.digest == run.data.tags["data.train_fingerprint"][:36]  # no synthetic: one set
    assert (
        sum(json.loads(train.dataset.profile)["per_class"].values())
        == json.loads(train.dataset.profile)["num_images"]
    )
    assert (
        client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"]
        == "custom_model_development"
    )
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    arts |= {a.path for d in ("data", "test") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"config.yaml", "data/train_grid.png", "data/counts.csv", "test/confusion_matrix.png"} <= arts
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "basic_cnn" in config and str(breast_npz) in config


def test_svc_fit_then_test_from_its_checkpoint(breast_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "-c",
        str(CONFIGS[0].parent / "svc.yaml"),
        *_small(breast_npz),
        "--model.init_args.backbone",
        "basic_cnn",
        "--model.init_args.pretrained",
        "false",
        "--trainer.logger.init_args.experiment_name",
        "cli-svc",
    ]
    main(["fit", *args])
    client, runs = _runs("cli-svc")
    fitted = runs[-1]
    ckpt = next(Path("outputs").rglob("*.ckpt"))
    main(["test", *args, "--ckpt_path", str(ckpt)])
    _, runs = _runs("cli-svc")
    tested = runs[-1]
    assert tested.info.run_id != fitted.info.run_id and tested.data.tags["stage"] == "test"
    assert tested.data.metrics["test/acc"] == pytest.approx(fitted.data.metrics["test/acc"])


@pytest.mark.parametrize("typo", [["--data.image_sise", "32"], ["--model.init_args.backbon", "resnet18"]])
def test_a_config_key_typo_names_the_key(typo, breast_npz, capsys):
    with pytest.raises(SystemExit):
        SynAugCLI(
            args=["-c", str(CONFIGS[0].parent / "resnet18.yaml"), *_small(breast_npz), *typo], run=False
        )
    assert typo[0].rsplit(".", 1)[-1] in capsys.readouterr().err


def test_a_typo_inside_a_yaml_file_names_the_key(breast_npz, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS[0].parent / "resnet18.yaml").read_text().replace("batch_size:", "bach_size:"))
    with pytest.raises(SystemExit):
        SynAugCLI(args=["-c", str(bad), "--data.root", str(breast_npz)], run=False)
    assert "bach_size" in capsys.readouterr().err


def test_data_audit_command(breast_npz, tmp_path, capsys):
    main(["data", "audit", str(breast_npz), "--report", str(tmp_path / "audit.json")])
    out = capsys.readouterr().out
    assert "780 images, 2 classes" in out and "1 groups with conflicting labels" in out
    assert '"imbalance_ratio"' in (tmp_path / "audit.json").read_text()


def test_help_version_and_a_typo_import_neither_torch_lightning_nor_mlflow():
    code = (
        "import sys, contextlib, io\n"
        "from synaug.cli import main\n"
        "for argv in (['--help'], ['--version'], ['fitt']):\n"
        "    with contextlib.suppress(SystemExit): main(argv)\n"
        "print(sorted(m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert all(name in out.stdout for name in [*COMMANDS, "fit", "validate"])
    assert "synaug 0." in out.stdout and "did you mean 'fit'?" in out.stderr


def test_an_unknown_command_exits_2_naming_the_closest(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["sampel", "--data", "x"])
    assert exit.value.code == 2 and "did you mean 'sample'?" in capsys.readouterr().err


def test_one_spelling_for_the_tracking_uri_and_the_experiment_everywhere():
    # a function named `tracking` / `name` takes `--tracking_uri` / `--experiment` as well, and keeps its own
    params = {"name": None, "tracking": None, "seeds": None}
    assert respell(["--tracking_uri", "u", "--experiment=e", "--seeds", "2"], params) == [
        "--tracking",
        "u",
        "--name=e",
        "--seeds",
        "2",
    ]
    assert respell(["--tracking", "u"], params) == ["--tracking", "u"]
    assert respell(["--tracking", "u", "--name", "e"], {"tracking_uri": None, "experiment": None}) == [
        "--tracking_uri",
        "u",
        "--experiment",
        "e",
    ]


def test_generate_from_folder_is_a_subcommand_and_the_old_spelling_still_runs(tmp_path, capsys):
    for argv in (["generate", "from-folder", "--help"], ["generate", "--from-folder", "--help"]):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 0
        assert "usage: synaug generate from-folder" in capsys.readouterr().out


def test_a_command_ends_with_where_its_results_are(tmp_path, monkeypatch):
    from synaug import tracking
    from synaug.cli import results_note

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, run_id = tracking.command_run("notes", "a-run", uri, {})

    def quality(out: str, tracking_uri: str | None = None): ...

    note = results_note(quality, None, {"out": "synthetic/x", "tracking_uri": uri})  # the run it made
    assert f"MLflow run a-run ({run_id}) in experiment notes" in note
    assert f"mlflow ui --backend-store-uri {uri}" in note and "output folder: synthetic/x" in note
    assert results_note(quality, None, {"tracking_uri": f"sqlite:///{tmp_path / 'other.db'}"}) == ""


def test_no_lightning_args_warning_when_sys_argv_holds_the_same_words(breast_npz, monkeypatch, recwarn):
    # `synaug fit ...` hands LightningCLI the words of sys.argv it has read: Lightning's warning is not for it
    args = ["-c", str(CONFIGS[0].parent / "basic_cnn.yaml"), *_small(breast_npz)]
    monkeypatch.setattr(sys, "argv", ["synaug", "fit", *args])
    SynAugCLI(args=args, run=False)
    assert not [w for w in recwarn if "args parameter is intended" in str(w.message)]


def test_quiet_by_default_and_verbose_brings_the_model_summary_back(breast_npz, monkeypatch, request):
    import logging
    import warnings

    from lightning.pytorch.callbacks import ModelSummary

    from synaug.cli import CHATTY, quiet

    levels = {name: logging.getLogger(name).level for name in CHATTY}
    request.addfinalizer(lambda: [logging.getLogger(n).setLevel(v) for n, v in levels.items()])
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    args = ["-c", str(CONFIGS[0].parent / "basic_cnn.yaml"), *_small(breast_npz)]
    quiet()  # what main() does without -v
    assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").isEnabledFor(logging.INFO)
    summaries = lambda cli: [c for c in cli.trainer.callbacks if isinstance(c, ModelSummary)]  # noqa: E731
    assert summaries(SynAugCLI(args=args, run=False)) == []
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.INFO)  # -v: Lightning's own
    assert len(summaries(SynAugCLI(args=args, run=False))) == 1


def test_a_command_help_is_built_once_then_printed_without_torch_lightning_or_mlflow(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("SYNAUG_CACHE", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "100")  # the width is part of the key: the same here and in the subprocess
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--help"])
    built = capsys.readouterr().out
    assert exit.value.code == 0 and "--trainer.max_epochs" in built and "--data.real_fraction" in built
    code = (
        "import sys, contextlib\n"
        "from synaug.cli import main\n"
        "with contextlib.suppress(SystemExit): main(['fit', '--help'])\n"
        "print(sorted(m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == built + "[]\n"


def test_a_command_help_is_built_again_when_synaug_a_package_the_width_or_v_changes(tmp_path, monkeypatch):
    source, site = tmp_path / "synaug", tmp_path / "site-packages"
    source.mkdir(), site.mkdir()
    (source / "cli.py").write_text("x = 1\n")
    monkeypatch.setattr(cli, "SOURCE", source)
    monkeypatch.setattr(cli.site, "getsitepackages", lambda: [str(site)])
    monkeypatch.setenv("COLUMNS", "100")
    keys = [cli.help_key(["fit", "--help"], False)]
    (source / "cli.py").write_text("x = 12\n")
    keys.append(cli.help_key(["fit", "--help"], False))
    (site / "lightning-9.0.dist-info").mkdir()
    keys.append(cli.help_key(["fit", "--help"], False))
    keys.append(cli.help_key(["fit", "--help"], True))
    monkeypatch.setenv("COLUMNS", "120")
    keys.append(cli.help_key(["fit", "--help"], True))
    keys.append(cli.help_key(["test", "--help"], True))
    assert len(set(keys)) == len(keys)
    assert cli.help_key(["test", "--help"], True) == keys[-1]


def test_last_ckpt_is_the_last_epoch_even_when_the_best_is_older(breast_npz, tmp_path, monkeypatch):
    # lr 0: the weights never change, so only the first epoch "improves" val/f1_macro
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--model", "synaug.classifiers.ImageClassifier", "--model.backbone", "basic_cnn"]
    args += ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.0"]
    args += ["--data.root", str(breast_npz), "--data.image_size", "28", "--trainer.max_epochs", "3"]
    args += [
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--test_after_fit",
        "false",
    ]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "out")]
    main(args)
    (last,) = tmp_path.glob("out/**/checkpoints/last.ckpt")
    (best,) = [p for p in last.parent.glob("*.ckpt") if p.name != "last.ckpt"]
    assert torch.load(last, weights_only=True)["epoch"] == 2  # the resume point: after the third epoch
    assert torch.load(best, weights_only=True)["epoch"] == 0
