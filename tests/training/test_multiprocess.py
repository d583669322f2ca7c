"""`magicid train` under `accelerate launch` with two CPU processes (DDP over gloo), on loopback.

- Two processes at `train.batch_size=2` follow one process at batch 4 (the same global batch): the loader shards the
  data order by batch, Clone Face samples and every random draw follow the sample (`sample_generators`), so the loss
  curves agree up to float summation order (stated tolerance below).
- The launched run logs one MLflow run, writes one adapter and registers one model version (rank 0 only).
- A two-process run killed (SIGKILL to the whole launch) after a checkpoint resumes under two processes to the
  same weights, bit for bit, as the uninterrupted two-process run.

Launcher: accelerate 1.15's `--cpu` launcher starts ONE process whatever `--num_processes` says (it fans out only
through `mpirun` with a hostfile); several CPU processes on one machine go through accelerate's torchrun launcher
(`--multi_gpu`) with ACCELERATE_USE_CPU=true, which the trainer turns into accelerate's MULTI_CPU state (gloo).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_settings import TINY_BACKBONE

pytestmark = pytest.mark.slow

STEPS = 6  # 8 train images at global batch 4: 2 steps an epoch, 3 epochs (reshuffles), every MMF mode
# Two processes vs one at the same global batch: the same samples and draws; what differs is the order of float
# sums (the VAE on 2 vs 4 images, DDP's all-reduce of two half-batch gradients vs one backward over 4).
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def eight_image_idzoom(tmp_path_factory) -> Path:
    from magicid.training.synthetic import write_synthetic_idzoom

    return write_synthetic_idzoom(tmp_path_factory.mktemp("idzoom8") / "v1", n_images=8, crop_size=64, seed=3)


def _overrides(out_dir: Path, tracking_dir: Path, batch_size: int) -> list[str]:
    tracking_dir.mkdir(parents=True, exist_ok=True)
    return [
        "model.resolution=64",
        "model.device=cpu",
        "model.id_crop_size=32",
        *TINY_BACKBONE,  # not params.yaml's shipped world
        f"train.batch_size={batch_size}",
        f"train.steps={STEPS}",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=3",
        "train.eval_every=0",
        "train.lr=1e-3",
        "train.clone_face.prob=0.5",  # Clone Face samples in the mix: they must follow the sample, not the process
        f"train.out_dir={out_dir}",
        f"tracking.uri=sqlite:///{tracking_dir / 'mlflow.db'}",
        f"tracking.artifact_root={tracking_dir / 'artifacts'}",
        "tracking.experiment=magicid-ddp",
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(data: Path, overrides: list[str], *extra: str) -> subprocess.Popen:
    # Run in the data's parent folder, which has no params.yaml: the embedded defaults plus `overrides`, as the
    # one-process run in this test (not the checkout's params.yaml).
    """`accelerate launch` of `magicid train` on 2 CPU processes, in its own process group (killable as one)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [
        str(accelerate),
        "launch",
        "--multi_gpu",  # accelerate's torchrun launcher; ACCELERATE_USE_CPU makes its processes CPU ones
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        "--main_process_ip=127.0.0.1",
        f"--main_process_port={_free_port()}",
        "-m",
        "magicid",
        *[arg for o in overrides for arg in ("--set", o)],
        "train",
        "--data",
        str(data),
        "--no-progress",
        *extra,
    ]
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",  # gloo on loopback only
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    return subprocess.Popen(
        command,
        env=env,
        cwd=data.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _kill_launch(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at once (torchrun starts its workers in their own sessions:
    killing the launcher's process group alone would leave them training)."""
    import psutil

    launcher = psutil.Process(process.pid)
    family = [*launcher.children(recursive=True), launcher]
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    process.communicate()


def _finish(process: subprocess.Popen, timeout: float = 600) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_launch(process)
        output = ""
        raise AssertionError(f"accelerate launch did not finish in {timeout} s:\n{output[-4000:]}") from None
    errors = [line for line in output.splitlines() if line.startswith("magicid: ") or "Error" in line]
    assert process.returncode == 0, "\n".join(errors[:10]) + "\n" + output[-4000:]
    return output


def _weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter.safetensors")


def test_two_processes_follow_one_at_the_same_global_batch_and_resume_exactly(
    eight_image_idzoom, tmp_path, tiny_train_params
):
    from mlflow import MlflowClient

    from magicid.training.trainer import train

    data = eight_image_idzoom
    # The uninterrupted two-process run (registers its adapter: one version, from rank 0 only).
    started = time.perf_counter()
    output = _finish(_launch(data, _overrides(tmp_path / "ddp", tmp_path / "track", batch_size=2)))
    two_process_s = time.perf_counter() - started
    run_ids = [line.split(": ")[1] for line in output.splitlines() if line.startswith("mlflow_run_id: ")]
    assert len(run_ids) == 1, output[-4000:]  # rank 1 reports nothing
    store = f"sqlite:///{tmp_path / 'track' / 'mlflow.db'}"
    # The registry too: MlflowClient's registry defaults to the process-wide mlflow.set_registry_uri of an earlier test.
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.get_experiment_by_name("magicid-ddp")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == run_ids and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["num_processes"] == "2"
    assert [str(v.version) for v in client.search_model_versions()] == ["1"]
    ddp_losses = {m.step: m.value for m in client.get_metric_history(run_ids[0], "loss")}
    assert sorted(ddp_losses) == list(range(1, STEPS + 1))
    assert (tmp_path / "ddp" / "adapter" / "adapter.safetensors").is_file()
    assert not (tmp_path / "ddp" / "adapter.tmp").exists()

    # One process at batch 4 (the same global batch), in this process.
    params = tiny_train_params(*_overrides(tmp_path / "single", tmp_path / "track-single", batch_size=4))
    single = train(params, data, progress=False, track=False)
    for step in range(1, STEPS + 1):
        assert ddp_losses[step] == pytest.approx(single.losses[step], rel=LOSS_RTOL), (
            f"step {step}: 2 processes x batch 2 {ddp_losses[step]:.6f}, 1 process x batch 4 "
            f"{single.losses[step]:.6f}"
        )
    # A curve that merely looks alike would also pass a loose tolerance: the steps differ among themselves by far
    # more than the tolerance, so matching at 1e-4 means the same samples and draws in every step.
    values = list(single.losses.values())
    assert max(values) / min(values) > 1 + 100 * LOSS_RTOL
    ddp_weights, single_weights = _weights(tmp_path / "ddp" / "adapter"), _weights(single.adapter_dir)
    # Adam turns float-order noise in near-zero gradients into updates of up to lr in size (seen: 4e-5 to 2.5e-4 from
    # one pair of runs to the next), so the weights are held to one Adam step (lr = 1e-3); the losses above are the
    # tight check.
    gaps = {key: float((value - single_weights[key]).abs().max()) for key, value in ddp_weights.items()}
    worst = max(gaps, key=gaps.get)
    assert gaps[worst] <= 1e-3, f"{worst}: two-process and one-process weights differ by {gaps[worst]:.2e}"

    # Killed after a checkpoint (SIGKILL to the launcher, torchrun and both workers at once), then resumed.
    killed_dir = tmp_path / "killed"
    overrides = _overrides(killed_dir, tmp_path / "track-killed", batch_size=2)
    process = _launch(data, overrides, "--no-register")
    first_checkpoint = killed_dir / "checkpoints" / "checkpoint_2" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while not first_checkpoint.is_file():
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.02)
    _kill_launch(process)
    assert not (killed_dir / "adapter").exists(), "the run finished before the kill: nothing was interrupted"
    _finish(_launch(data, overrides, "--no-register", "--resume"))
    resumed_weights = _weights(killed_dir / "adapter")
    assert resumed_weights.keys() == ddp_weights.keys()
    different = [k for k in ddp_weights if not torch.equal(ddp_weights[k], resumed_weights[k])]
    assert not different, f"resumed two-process run differs from the uninterrupted one in {different[:5]}"
    print(f"\ntwo-process launch (uninterrupted, {STEPS} steps): {two_process_s:.1f} s")
