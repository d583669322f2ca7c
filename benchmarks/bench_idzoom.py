"""IDZoom build speed: the whole `build-data` on the sample photos, and, named apart, the analysis alone.

Whole build (figures `idzoom_build_*`, `idzoom_rebuild_*`): `magicid.data.remote.build_idzoom_at`, the call the
`build-data` command makes (in-process: Python start-up and the CLI's imports are not timed), with
`data.workers` processes (params.yaml: 2). Input: the sample raw set as `magicid sample-data` writes it (portraits,
composited group photos, identities.json) plus two inputs the builder must quarantine (a truncated copy of
astronaut.png, decoded and refused in a worker; a byte-identical duplicate, refused while hashing). Each cold build
writes a fresh output folder, so everything a build does is timed: listing and hashing the inputs, spawning the
worker pool and loading its models, analysis, the journal, identity labels, splits, the manifests (images, faces,
quarantine), stats.json, the ledger, garbage collection and clearing the journal.
- `idzoom_build_seconds`: median wall time of one cold build (--quick: one build, else three).
- `idzoom_build_seconds_per_input`: that over all inputs; `idzoom_build_seconds_per_image`: over the images taken.
- `idzoom_rebuild_seconds`: median wall time of a re-run on the same inputs and output (nothing analysed: listing,
  hashing, reuse checks, manifests, stats, ledger).
- `idzoom_build_inputs`, `_images`, `_faces`, `_quarantined`: what the build found (checked against a rebuild).

Analysis only (figures `idzoom_analysis_*`): `worker.process_input` (decode, analyse faces, pose, crops, condition
maps, PNG writes) in warm `spawn` pools whose workers have their models loaded already; no hashing, journal,
manifests or pool start-up. Inputs: the 512x512 astronaut (1 face) and t1.jpg (1280x886, 6 faces).
- `idzoom_analysis_images_per_s_1worker`, `idzoom_analysis_images_per_s_2workers` (astronaut; medians over rounds),
  `idzoom_analysis_faces_per_s_2workers` (t1), `idzoom_analysis_scaling_2_vs_1` (median over rounds of the 2-worker
  rate over the 1-worker rate, the two timed back to back in each round).
Targets (analysis only, 2 otherwise idle cores): >= 12 images/s with 2 workers on the astronaut, scaling >= 1.8.

Prints `name: value` lines only.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from magicid.config import Params, load_params
from magicid.data.builder import BuildReport
from magicid.data.remote import build_idzoom_at
from magicid.data.sample import build_sample_set, package_photo
from magicid.data.worker import Task, process_input, worker_pool


# ---------------------------------------------------------------------------------------------------------------
# whole build
# ---------------------------------------------------------------------------------------------------------------
def sample_inputs(folder: Path, params: Params) -> Path:
    """The sample raw set (`magicid sample-data`) plus a truncated copy of astronaut.png and a duplicate."""
    build_sample_set(folder, params)
    astronaut = (folder / "astronaut.png").read_bytes()
    (folder / "astronaut_truncated.png").write_bytes(astronaut[: len(astronaut) // 2])
    shutil.copyfile(folder / "astronaut.png", folder / "astronaut_duplicate.png")
    return folder


def timed_build(raw: Path, out: Path, params: Params) -> tuple[float, BuildReport]:
    """(wall seconds, report) of one `build-data` call from `raw` into `out`."""
    start = time.perf_counter()
    report = build_idzoom_at(raw, out, params, progress=False)
    return time.perf_counter() - start, report


def build_figures(tmp: Path, params: Params, rounds: int) -> dict[str, float | int]:
    raw = sample_inputs(tmp / "raw", params)
    cold, warm, reports = [], [], []
    for round_index in range(rounds):
        out = tmp / f"idzoom_{round_index}"
        seconds, report = timed_build(raw, out, params)
        if (
            report.n_reused
            or report.n_processed + report.quarantine_reasons.get("duplicate", 0) != report.n_inputs
        ):
            raise SystemExit(f"a cold build reused or skipped inputs: {report}")
        cold.append(seconds)
        reports.append(report)
        seconds, again = timed_build(raw, out, params)
        if again.n_processed or (again.n_images, again.n_faces) != (report.n_images, report.n_faces):
            raise SystemExit(f"the rebuild analysed inputs again or found other counts: {again} vs {report}")
        warm.append(seconds)
    report = reports[0]
    if {(r.n_images, r.n_faces, r.n_quarantined) for r in reports} != {
        (report.n_images, report.n_faces, report.n_quarantined)
    }:
        raise SystemExit(f"cold builds disagree: {reports}")
    if report.n_quarantined < 2 or not report.n_images:
        raise SystemExit(f"expected the two planted inputs quarantined and the photos taken: {report}")
    build_seconds = statistics.median(cold)
    return {
        "idzoom_build_seconds": build_seconds,
        "idzoom_build_seconds_per_input": build_seconds / report.n_inputs,
        "idzoom_build_seconds_per_image": build_seconds / report.n_images,
        "idzoom_rebuild_seconds": statistics.median(warm),
        "idzoom_build_inputs": report.n_inputs,
        "idzoom_build_images": report.n_images,
        "idzoom_build_faces": report.n_faces,
        "idzoom_build_quarantined": report.n_quarantined,
    }


# ---------------------------------------------------------------------------------------------------------------
# analysis only
# ---------------------------------------------------------------------------------------------------------------
def warm_up(pool, tasks: list[Task]) -> None:
    """Run `tasks` untimed (two per worker): models are loaded and caches filled before timing."""
    pool.map(process_input, tasks, chunksize=1)


def timed_rate(pool, tasks: list[Task]) -> tuple[float, int]:
    """(inputs per second, faces found) over `tasks`."""
    start = time.perf_counter()
    records = pool.map(process_input, tasks, chunksize=1)
    elapsed = time.perf_counter() - start
    bad = [r for r in records if r["status"] != "image"]
    if bad:
        raise SystemExit(f"benchmark input was quarantined: {bad[0]}")
    return len(tasks) / elapsed, sum(len(r["faces"]) for r in records)


def analysis_figures(tmp: Path, params: Params, n_astronaut: int, n_t1: int, rounds: int) -> dict[str, float]:
    from skimage import data as skdata

    astronaut = tmp / "astronaut.png"
    Image.fromarray(np.ascontiguousarray(skdata.astronaut())).save(astronaut)
    t1 = package_photo("t1.jpg")
    out = str(tmp / "analysis_out")

    def tasks(path: Path, n: int, tag: str) -> list[Task]:
        return [Task(str(path), path.name, f"{tag}{i:04d}", out) for i in range(n)]

    # The 1- and 2-worker pools are timed in alternating rounds (both stay loaded; an idle pool costs no CPU):
    # the machine's speed drifts between minutes, and each round's ratio sees one speed.
    one_worker, two_workers = [], []
    with worker_pool(params, 1) as pool_1, worker_pool(params, 2) as pool_2:
        warm_up(pool_1, tasks(astronaut, 2, "w1_"))
        warm_up(pool_2, tasks(astronaut, 4, "w2_"))
        for round_index in range(rounds):
            one_worker.append(timed_rate(pool_1, tasks(astronaut, n_astronaut // 2, f"a1r{round_index}_"))[0])
            two_workers.append(timed_rate(pool_2, tasks(astronaut, n_astronaut, f"a2r{round_index}_"))[0])
        t1_ips, t1_faces = timed_rate(pool_2, tasks(t1, n_t1, "t1_"))
    return {
        "idzoom_analysis_images_per_s_1worker": statistics.median(one_worker),
        "idzoom_analysis_images_per_s_2workers": statistics.median(two_workers),
        "idzoom_analysis_faces_per_s_2workers": t1_ips * t1_faces / n_t1,
        "idzoom_analysis_scaling_2_vs_1": statistics.median(
            [b / a for a, b in zip(one_worker, two_workers, strict=True)]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="one build and one analysis round (about a minute)"
    )
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params override, e.g. data.workers=1 (repeatable)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)  # the parent only lists, hashes and writes manifests; workers pin themselves
    params = load_params(args.params, args.set)
    build_rounds, (n_astronaut, n_t1, rounds) = (1, (12, 4, 1)) if args.quick else (3, (32, 12, 3))
    with tempfile.TemporaryDirectory() as tmp:
        figures = {
            **build_figures(Path(tmp), params, build_rounds),
            **analysis_figures(Path(tmp), params, n_astronaut, n_t1, rounds),
        }
    for key, value in figures.items():
        print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
