"""The analysis notebooks run top to bottom on tiny runs made first, and are stored without outputs.

Each notebook is executed by nbclient in a `python3` kernel: jupyter_client launches a kernelspec whose command is
`python` with `sys.executable`, so the kernel is this venv's Python with this checkout's synaug. Parameters are
injected by replacing the source of the cell tagged `parameters`.
"""

import os
import sys
from pathlib import Path

import mlflow
import nbformat
import pandas as pd
import pytest
import torch
from jupyter_client import KernelManager
from nbclient import NotebookClient

from synaug import notebooks, tracking
from synaug.evaluation.explain import explain
from synaug.evaluation.quality import quality

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _code_cells(path: Path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_notebooks_are_stored_without_outputs_and_start_with_parameters():
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {p.stem for p in paths} == {"compare_runs", "generator_samples", "gradcam"}
    for path in paths:
        nbformat.validate(nbformat.read(path, as_version=4))
        cells = _code_cells(path)
        assert all(c.outputs == [] and c.execution_count is None for c in cells), f"{path.name} has outputs"
        assert cells[0].metadata.get("tags") == ["parameters"], (
            f"{path.name}: first code cell is not parameters"
        )


def test_the_kernel_is_this_python():
    assert KernelManager(kernel_name="python3").format_kernel_cmd()[0] == sys.executable


def test_baselines_pair_cells_by_classifier_policy_and_fraction():
    cells = pd.DataFrame(
        {
            "classifier": ["cnn", "cnn", "cnn", "cnn", "vit"],
            "policy": ["none"] * 5,
            "real_fraction": [1.0, 1.0, 0.5, 0.5, 1.0],
            "generator": ["none", "diffusion", "none", "diffusion", "diffusion"],
            "ratio": [0.0, 0.5, 0.0, 1.0, 0.5],
        },
        index=["cnn", "cnn+syn", "cnn half", "cnn half+syn", "vit+syn"],
    )
    # the ViT cell has no baseline: it gets no comparison rather than the CNN's
    assert notebooks.baselines(cells) == {"cnn+syn": "cnn", "cnn half+syn": "cnn half"}
    assert list(notebooks.where(cells, real_fraction=0.5).index) == ["cnn half", "cnn half+syn"]
    twin = pd.concat([cells, cells.iloc[[0]].rename(index={"cnn": "cnn again"})])
    with pytest.raises(ValueError, match=r"baseline cells \['cnn', 'cnn again'\]"):
        notebooks.baselines(twin)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, breast_npz) -> dict[str, str]:
    """Tiny runs for the notebooks to read: a fake 2-cell x 3-seed experiment, a basic CNN trained for a few
    steps, a synthetic folder with its `synaug quality` run, and a `synaug explain` run."""
    root = tmp_path_factory.mktemp("notebooks")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    uri = tracking.tracking_uri()
    notebooks.demo_experiment("nb-demo", seeds=3, tracking_uri=uri)
    checkpoint = notebooks.demo_classifier(breast_npz, root, max_steps=20)
    synthetic = notebooks.demo_synthetic(breast_npz, root / "synthetic", n=6)
    # leak_threshold 1: the barely trained CNN's features call everything a near-duplicate.
    quality(
        str(breast_npz),
        str(synthetic),
        feature="classifier",
        checkpoint_path=str(checkpoint),
        image_size=28,
        in_chans=1,
        kid_subsets=10,
        leak_threshold=1.0,
        experiment="nb-quality",
    )
    explain(str(checkpoint), str(breast_npz), [str(synthetic)], n=4, experiment="nb-explain")
    torch.set_num_threads(threads)
    return {
        "root": str(root),
        "uri": uri,
        "checkpoint": str(checkpoint),
        "synthetic": str(synthetic),
        "data": str(breast_npz),
    }


def execute(name: str, parameters: dict, cwd: str) -> list:
    """Run notebooks/<name>.ipynb with `parameters` in place of its parameters cell; returns its code cells."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": cwd}})
    client.execute(env=os.environ | {"OMP_NUM_THREADS": "1"})  # raises CellExecutionError on any error
    return [c for c in nb.cells if c.cell_type == "code"]


def _outputs(cells: list, kind: str) -> list[str]:
    """Every output of `kind` (a MIME type, or "stream") in the cells."""
    found = []
    for cell in cells:
        for out in cell.outputs:
            if kind == "stream" and out.output_type == "stream":
                found.append(out.text)
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


def test_compare_runs(demo):
    cells = execute(
        "compare_runs",
        {
            "experiment": "nb-demo",
            "tracking_uri": demo["uri"],
            "metric": "test/f1_macro",
            "minority_metric": "test/recall/malignant",
            "curve_cells": {"policy": "hflip"},
        },
        demo["root"],
    )
    table = "".join(_outputs(cells, "text/markdown"))
    assert "| basic_cnn/hflip/diffusion x0.5 | 3 |" in table and "baseline" in table
    assert len(_outputs(cells, "image/png")) == 3  # two CI plots and the ratio curve


def test_generator_samples(demo):
    cells = execute(
        "generator_samples",
        {
            "synthetic": demo["synthetic"],
            "quality_experiment": "nb-quality",
            "quality_run_id": None,
            "tracking_uri": demo["uri"],
            "n": 4,
            "seed": 0,
        },
        demo["root"],
    )
    html = "".join(_outputs(cells, "text/html"))
    assert "fid" in html and "memorized_share" in html and "nearest_train" in html
    assert len(_outputs(cells, "image/png")) == 2  # the sample grid and the closest pairs


def test_gradcam(demo):
    cells = execute(
        "gradcam",
        {
            "experiment": "nb-explain",
            "run_id": None,
            "tracking_uri": demo["uri"],
            "checkpoint": demo["checkpoint"],
            "data": demo["data"],
            "synthetic": [demo["synthetic"]],
            "classes": ["malignant"],
            "n": 3,
            "method": "auto",
        },
        demo["root"],
    )
    html = "".join(_outputs(cells, "text/html"))
    assert "similarity" in html and "hirescam" in html  # the logged table, then the live one
    # logged: mean maps and overlays of 2 classes; live: the same for 1 class
    assert len(_outputs(cells, "image/png")) == 4 + 2


def test_runs_of_an_experiment_whose_name_holds_a_quote(tmp_path):
    # main built the filter as f"tags.experiment = '{experiment}'": a quote in the name broke the search
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment('surgeon\'s "grid"')
    for seed, cell in enumerate(["cnn/it's/none", "cnn/it's/none", "plain"]):
        run = client.create_run(
            exp_id,
            tags={"experiment": 'surgeon\'s "grid"', "cell": cell, "seed": str(seed), "subset_seed": "0"},
        ).info.run_id
        client.log_metric(run, "test/f1_macro", 0.5 + seed / 10)
        client.set_terminated(run)
    runs = notebooks.experiment_runs('surgeon\'s "grid"', uri)
    assert runs["cell"].tolist() == ["cnn/it's/none", "cnn/it's/none", "plain"]
    assert runs["unit"].tolist() == ["0", "0", "0"]
    results, _ = notebooks.results_table(runs)
    assert set(results.columns) == {"cell", "seed", "unit", "metric", "value"}
