import os
import subprocess
import sys

import mlflow

from synaug import tracking
from synaug.experiment import runs


def test_mark_killed_finds_dead_runs_of_this_host_on_every_page_whatever_its_name(tmp_path, monkeypatch):
    monkeypatch.setattr(
        tracking.socket, "gethostname", lambda: "lab's pc"
    )  # a quote: no filter string holds it
    monkeypatch.setattr(runs, "PAGE", 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = client.create_experiment("killed")

    def run(host: str, pid: int) -> str:
        return client.create_run(exp_id, tags={tracking.HOST: host, tracking.PID: str(pid)}).info.run_id

    gone = [run("lab's pc", dead.pid), run("lab's pc", dead.pid)]
    alive, elsewhere = run("lab's pc", os.getpid()), run("other", dead.pid)
    assert sorted(tracking.mark_killed(client, exp_id)) == sorted(gone)
    status = {r: client.get_run(r).info.status for r in [*gone, alive, elsewhere]}
    assert status == {gone[0]: "KILLED", gone[1]: "KILLED", alive: "RUNNING", elsewhere: "RUNNING"}
