import mlflow
import pytest

from synaug.experiment import runs


def test_search_follows_every_page_oldest_first(tmp_path, monkeypatch):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = client.create_experiment("paged")
    made = [
        client.create_run(exp_id, start_time=1000 + i, tags={"level": "seed"}).info.run_id for i in range(5)
    ]
    client.create_run(exp_id, tags={"level": "cell"})
    client.set_terminated(made[1])
    monkeypatch.setattr(runs, "PAGE", 2)  # 5 matching runs: three pages
    assert [r.info.run_id for r in runs.search(client, exp_id, {"level": "seed"})] == made
    assert [r.info.run_id for r in runs.search(client, exp_id, {"level": "seed"}, status="FINISHED")] == [
        made[1]
    ]
    assert len(runs.search(client, exp_id, {"level": "seed"}, status="RUNNING")) == 4
    with pytest.raises(Exception, match="Valid run status strings"):
        runs.search(client, exp_id, {"level": "seed"}, status="DONE")


def test_every_page_of_experiments(tmp_path, monkeypatch):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    made = {client.create_experiment(name) for name in ("a", "b", "c")}
    monkeypatch.setattr(runs, "PAGE", 1)
    assert made < {e.experiment_id for e in runs.every_page(client.search_experiments)}  # and "Default"
