"""The Prefect flows run locally (ephemeral API, no server) and only wire magicid functions together."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_flows_hold_no_science():
    found = subprocess.run(
        ["grep", "-rlE", "import torch|diffusers", str(ROOT / "flows")], capture_output=True, text=True
    )
    assert found.stdout == "", f"flows import model code directly: {found.stdout}"


def _tiny_raw_set(folder: Path) -> Path:
    """One photo with one face and one corrupt file (a face row and a quarantine row)."""
    from skimage import data as skdata

    folder.mkdir()
    Image.fromarray(np.ascontiguousarray(skdata.astronaut())).save(folder / "astronaut.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


@pytest.mark.slow
def test_build_idzoom_flow_builds_and_validates(prefect_home, tmp_path):
    from flows.build_idzoom import build_idzoom_flow

    raw = _tiny_raw_set(tmp_path / "raw")
    report = build_idzoom_flow(
        str(raw),
        str(tmp_path / "idzoom"),
        report_dir=str(tmp_path / "reports"),
        params_path=None,
        overrides=["data.workers=1"],
    )
    assert report["n_images"] == 1 and report["n_quarantined"] == 1 and report["n_faces"] == 1
    assert report["validation"]["passed"] > 0
    assert Path(report["validation"]["docs"]).is_file()


def _dataset_content(root: Path) -> dict:
    """What a build wrote: the manifests' rows, stats.json, and every file's sha256 (the journal aside)."""
    import hashlib
    import json

    import pyarrow.parquet as pq

    tables = {name: pq.read_table(root / name).to_pylist() for name in ("images.parquet", "faces.parquet")}
    tables["quarantine.parquet"] = pq.read_table(root / "quarantine.parquet").to_pylist()
    files = {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".journal" not in path.parts and path.suffix != ".parquet"
    }
    return {"tables": tables, "stats": json.loads((root / "stats.json").read_text()), "files": files}


@pytest.mark.slow
def test_build_idzoom_fan_out_on_dask_matches_the_process_pool(tmp_path):
    """The same raw set analysed on a Dask cluster (prefect-dask) and on Prefect's process pool gives the same
    dataset version: manifests, quarantine, stats and files."""
    from distributed import LocalCluster

    from flows.build_idzoom import run_build_idzoom

    raw = _tiny_raw_set(tmp_path / "raw")
    common = dict(input_dir=str(raw), params_path=None, overrides=["data.workers=1"])
    on_pool = run_build_idzoom(
        None, workers=1, out_dir=str(tmp_path / "pool"), report_dir=str(tmp_path / "pool-reports"), **common
    )
    # One worker process (the pool: one worker too), one thread: a real process boundary (arguments and results
    # pickled, as on a cluster) at the least cost; a random dashboard port, never a user's 8787.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        on_dask = run_build_idzoom(
            cluster.scheduler_address,
            out_dir=str(tmp_path / "dask"),
            report_dir=str(tmp_path / "dask-reports"),
            **common,
        )
        # The scheduler's cumulative count of tasks that finished (reached "memory") on the cluster.
        ran_on_dask = {
            name: prefix.state_counts["memory"] for name, prefix in cluster.scheduler.task_prefixes.items()
        }
    assert sum(ran_on_dask.values()) == 2, ran_on_dask  # one analyse-shard per input (2 shards)
    assert on_pool["n_analysed"] == on_dask["n_analysed"] == 2
    assert (on_dask["n_images"], on_dask["n_faces"], on_dask["n_quarantined"]) == (1, 1, 1)
    assert on_dask["quarantine_reasons"] == on_pool["quarantine_reasons"] == {"not_an_image": 1}
    assert on_dask["data_version"] == on_pool["data_version"]
    pool, dask = _dataset_content(tmp_path / "pool"), _dataset_content(tmp_path / "dask")
    assert dask["tables"] == pool["tables"]
    assert dask["stats"] == pool["stats"]
    assert dask["files"] == pool["files"]
