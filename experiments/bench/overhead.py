"""Framework overhead: `synaug fit` against the plain PyTorch loop beside it (overhead_plain.py), as whole
processes, alternately, on the same job (BreastMNIST 28 px, ResNet-18 from scratch, hflip, Adam 1e-3, batch 64,
validation each epoch, the best checkpoint tested once). Prints each pair's wall times and the median ratio,
with both test metrics and the load average (the machine may be shared). Targets: ratio <= 1.15 at 5 epochs,
<= 1.05 at 30. The MLflow store is created before the first pair, as a user's `mlruns/` exists after their
first run (creating a fresh SQLite store runs MLflow's migrations: 1-2 s, once).

    python experiments/bench/overhead.py [--pairs 3] [--epochs 5]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NPZ = HERE.parents[1] / ".." / "shared" / "data" / "medmnist" / "breastmnist.npz"


def timed(cmd: list[str], cwd: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    synaug = str(Path(sys.executable).with_name("synaug"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fit = [
            synaug,
            "fit",
            "-c",
            str(HERE / "overhead.yaml"),
            "--data.root",
            str(NPZ.resolve()),
            "--trainer.max_epochs",
            str(args.epochs),
            "--trainer.logger.init_args.tracking_uri",
            f"sqlite:///{tmp}/mlflow.db",
            "--trainer.default_root_dir",
            f"{tmp}/outputs",
        ]
        plain = [
            sys.executable,
            str(HERE / "overhead_plain.py"),
            "--npz",
            str(NPZ),
            "--epochs",
            str(args.epochs),
        ]
        create = "from synaug.tracking import tracking_uri; import sys; tracking_uri(sys.argv[1])"
        subprocess.run([sys.executable, "-c", create, f"sqlite:///{tmp}/mlflow.db"], check=True)
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
        for i in range(args.pairs):
            t_synaug, out = timed(fit, tmp)
            acc = re.search(r"test/acc\s*│\s*([0-9.]+)", out)
            f1 = re.search(r"test/f1_macro\s*│\s*([0-9.]+)", out)
            t_plain, out_plain = timed(plain, tmp)
            metrics = json.loads(out_plain.strip().splitlines()[-1])
            rows.append((t_synaug, t_plain))
            print(
                f"pair {i}: synaug {t_synaug:.1f} s (test acc {acc and acc[1]}, macro-F1 {f1 and f1[1]}), "
                f"plain {t_plain:.1f} s (test acc {metrics['test/acc']:.4f}, macro-F1 "
                f"{metrics['test/f1_macro']:.4f}), ratio {t_synaug / t_plain:.2f}",
                flush=True,
            )
    ratios = [a / b for a, b in rows]
    print(
        f"median ratio synaug/plain over {len(rows)} pairs: {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}); medians {statistics.median(a for a, _ in rows):.1f} s vs "
        f"{statistics.median(b for _, b in rows):.1f} s, {args.epochs} epochs; load average after: "
        f"{os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
