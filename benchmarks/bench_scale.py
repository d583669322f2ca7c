"""Beyond one machine, measured on this one: the review store on PostgreSQL beside SQLite, and two training processes
beside one.

Review store: bench_reviews.py's store (1,000 generations, 20 reviewers, 10,000 ratings, 2,000 judgements) in a
SQLite file and in a throw-away PostgreSQL 15 cluster on loopback (tests/pg_cluster.py, PostgreSQL's default durable
settings, TCP through psycopg 3). Timed: one reviewer's queue of a version and every version's aggregates (medians).

Training: `magicid train` on a synthetic IDZoom version (8 images) at the same global batch 4: one process at batch 4
(plain CLI) and two CPU processes at batch 2 under `accelerate launch` (DDP over gloo), MLflow on, no checkpoints but
the last; samples/s from the per-step `loss` metric timestamps after the warm-up steps (process start-up excluded).

Prints `name: value` lines:
- `scale_reviews_queue_ms_sqlite`, `scale_reviews_queue_ms_postgresql`, `scale_reviews_queue_pg_over_sqlite`
- `scale_reviews_aggregate_ms_sqlite`, `scale_reviews_aggregate_ms_postgresql`, `scale_reviews_aggregate_pg_over_sqlite`
- `scale_train_samples_per_s_1proc`, `scale_train_samples_per_s_2proc`, `scale_train_2proc_over_1proc`
- `scale_train_cpu_cores` (the machine's cores: two processes cannot beat one on fewer than two free cores)
`--quick`: fewer timing repeats and training steps at 64 px (about 2 minutes on 2 shared cores, mostly start-up).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_reviews import N_CASES, N_REVIEWERS, build_store
from timing import median_seconds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the throw-away cluster the tests use

from pg_cluster import PostgresCluster, server_bin_dir  # noqa: E402

GLOBAL_BATCH = 4


def review_store_ms(url: str, repeats: int) -> tuple[float, float]:
    store = build_store(url)
    aggregates = store.aggregates()
    assert aggregates["1"].n_ratings + aggregates["2"].n_ratings == N_REVIEWERS * N_CASES
    assert len(store.queue("reviewer00", "2")) == N_CASES
    queue_s = median_seconds(lambda: store.queue("reviewer00", "2"), repeats, warmup=2)
    aggregate_s = median_seconds(lambda: store.aggregates(champion="1"), repeats, warmup=2)
    store.close()
    return queue_s * 1000, aggregate_s * 1000


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_samples_per_s(
    workdir: Path, data: Path, processes: int, steps: int, warmup: int, resolution: int
) -> float:
    """Global samples per second of `magicid train` with `processes` CPU processes at global batch GLOBAL_BATCH."""
    from mlflow import MlflowClient

    tracking = workdir / f"mlflow-{processes}.db"
    overrides = [
        f"model.resolution={resolution}",
        "model.device=cpu",
        "model.backbone=tiny",  # the random tiny backbone and a fresh adapter: the loop's speed, not the world's
        "model.adapter_path=null",
        "train.init_from=null",
        f"train.batch_size={GLOBAL_BATCH // processes}",
        f"train.steps={steps}",
        f"train.checkpoint_every={steps}",
        "train.eval_every=0",
        f"train.out_dir={workdir / f'train-{processes}'}",
        f"tracking.uri=sqlite:///{tracking}",
        f"tracking.artifact_root={workdir / 'artifacts'}",
        f"tracking.experiment=bench-scale-{processes}",
    ]
    magicid = ["-m", "magicid", *[a for o in overrides for a in ("--set", o)]]
    magicid += ["train", "--data", str(data), "--no-progress", "--no-register"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    if processes == 1:
        command = [sys.executable, *magicid]
    else:
        # accelerate's torchrun launcher; ACCELERATE_USE_CPU makes its processes CPU ones (its --cpu launcher would
        # start only one process): README "Beyond one machine".
        env["ACCELERATE_USE_CPU"] = "true"
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu"]
        command += [
            f"--num_processes={processes}",
            "--num_machines=1",
            "--mixed_precision=no",
            "--dynamo_backend=no",
        ]
        command += ["--main_process_ip=127.0.0.1", f"--main_process_port={_free_port()}", *magicid]
    done = subprocess.run(
        command, env=env, cwd=workdir, capture_output=True, text=True
    )  # no params.yaml there
    if done.returncode != 0:
        raise SystemExit(
            f"training with {processes} process(es) failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    run_id = next(
        line.split(": ")[1] for line in done.stdout.splitlines() if line.startswith("mlflow_run_id: ")
    )
    history = {
        m.step: m.timestamp for m in MlflowClient(f"sqlite:///{tracking}").get_metric_history(run_id, "loss")
    }
    first, last = warmup, max(history)
    return (last - first) * GLOBAL_BATCH / ((history[last] - history[first]) / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and training steps")
    args = parser.parse_args()
    repeats = 5 if args.quick else 20
    steps, warmup, resolution = (10, 3, 64) if args.quick else (30, 5, 128)
    if server_bin_dir() is None:
        raise SystemExit("PostgreSQL server binaries (initdb) are missing: `make postgres` installs them")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sqlite_queue, sqlite_aggregate = review_store_ms(f"sqlite:///{tmp / 'reviews.db'}", repeats)
        with PostgresCluster(durable=True) as cluster:
            pg_queue, pg_aggregate = review_store_ms(cluster.create_database("bench"), repeats)

        from magicid.training.synthetic import write_synthetic_idzoom

        data = write_synthetic_idzoom(tmp / "idzoom", n_images=8, crop_size=128, seed=0)
        one = train_samples_per_s(tmp, data, 1, steps, warmup, resolution)
        two = train_samples_per_s(tmp, data, 2, steps, warmup, resolution)

    print(f"scale_reviews_queue_ms_sqlite: {sqlite_queue:.2f}")
    print(f"scale_reviews_queue_ms_postgresql: {pg_queue:.2f}")
    print(f"scale_reviews_queue_pg_over_sqlite: {pg_queue / sqlite_queue:.2f}")
    print(f"scale_reviews_aggregate_ms_sqlite: {sqlite_aggregate:.2f}")
    print(f"scale_reviews_aggregate_ms_postgresql: {pg_aggregate:.2f}")
    print(f"scale_reviews_aggregate_pg_over_sqlite: {pg_aggregate / sqlite_aggregate:.2f}")
    print(f"scale_train_samples_per_s_1proc: {one:.2f}")
    print(f"scale_train_samples_per_s_2proc: {two:.2f}")
    print(f"scale_train_2proc_over_1proc: {two / one:.2f}")
    print(f"scale_train_cpu_cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
