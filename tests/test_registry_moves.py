"""Registry moves that survive a kill, the first use of a new tracking database by two processes, and a tracking
server that does not answer (issue 27, item 4)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from registry_kill_driver import KILLED, params_for

from magicid import promotion, registry

DRIVER = Path(__file__).with_name("registry_kill_driver.py")


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _kill_each_write(store: Path, kind: str, variants: tuple[str, ...]) -> dict:
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(store), kind, ",".join(variants)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, child in report["models"].items():
        assert child["exit"] == KILLED, f"{name}: the child ended with {child['exit']}, not at its kill point"
    return report


def _state(params) -> tuple[dict[str, str], dict[str, dict[str, str]], promotion.AliasMove | None]:
    """Aliases, each version's tags, and the pending move of the model."""
    client = registry.open_client(params)
    name = params.promotion.model_name
    tags = {str(v.version): dict(v.tags) for v in client.search_model_versions(f"name='{name}'")}
    return registry.aliases(params), tags, promotion.pending_move(client, name)


def _promoted(tags: dict[str, str]) -> bool:
    return tags.get("promotion.decision") == "pass" and tags.get("promotion.action") == "promoted"


@pytest.mark.slow  # processes that import MLflow, or a new tracking store: seconds each
def test_promote_killed_before_any_write_is_finished_by_a_rerun_of_promote_or_rollback(tmp_path):
    report = _kill_each_write(tmp_path, "promote", ("promote", "rollback"))
    assert report["writes"] >= 5  # decision tags, the record, previous, champion, clearing the record
    for name in report["models"]:
        params = params_for(tmp_path, name)
        aliases, tags, move = _state(params)
        # What the kill left: either nothing moved yet (no record), or a recorded move of 2 over 1.
        if move is None:
            assert aliases == {"challenger": "2", "champion": "1"}, name
            assert not _promoted(tags["2"]), name
        else:
            assert (move.kind, move.to, move.former) == ("promote", "2", "1"), name
            assert aliases["champion"] in ("1", "2") and aliases.get("previous") in (None, "1"), name
        if name.endswith("-promote"):
            decision = promotion.promote(params)
            assert decision.action == ("promoted" if move is None else "already_champion"), name
            assert (decision.recovered is not None) == (move is not None), name
            aliases, tags, after = _state(params)
            assert after is None
            assert aliases == {"challenger": "2", "champion": "2", "previous": "1"}, name
            assert _promoted(tags["2"]) and tags["2"]["promotion.against"] == "1", name
            assert (
                promotion.ROLLED_BACK_TAG not in tags["1"] and promotion.ROLLED_BACK_TAG not in tags["2"]
            ), name
        else:
            # The user's next command is a rollback: a recorded promote is finished, then undone; a promote that
            # had not moved anything leaves nothing to roll back to.
            if move is None:
                with pytest.raises(registry.RegistryError, match="nothing to roll back"):
                    promotion.rollback(params)
                aliases, tags, _ = _state(params)
                assert aliases == {"challenger": "2", "champion": "1"}, name
                assert promotion.ROLLED_BACK_TAG not in tags["1"], name
                continue
            decision = promotion.rollback(params)
            assert decision.action == "rolled_back" and decision.recovered is not None, name
            aliases, tags, after = _state(params)
            assert after is None
            assert aliases == {"challenger": "2", "champion": "1"}, name
            assert tags["2"][promotion.ROLLED_BACK_TAG] == "true", name
            assert promotion.ROLLED_BACK_TAG not in tags["1"], name  # never the champion itself


@pytest.mark.slow  # processes that import MLflow, or a new tracking store: seconds each
def test_rollback_killed_before_any_write_is_finished_by_a_rerun(tmp_path):
    report = _kill_each_write(tmp_path, "rollback", ("rollback", "promote"))
    assert (
        report["writes"] >= 4
    )  # the record, champion, previous removed, rolled-back tag, clearing the record
    for name in report["models"]:
        params = params_for(tmp_path, name)
        aliases, tags, move = _state(params)
        if move is None:
            assert aliases == {"challenger": "2", "champion": "2", "previous": "1"}, name
            assert promotion.ROLLED_BACK_TAG not in tags["2"], name
        else:
            assert (move.kind, move.to, move.former) == ("rollback", "1", "2"), name
        if name.endswith("-rollback"):
            decision = promotion.rollback(params)
            assert (decision.action, decision.version, decision.champion) == ("rolled_back", "2", "1"), name
        else:
            # A promote finishes the recorded rollback, then refuses the rolled-back challenger; without a record
            # nothing had moved: the challenger is champion already.
            if move is None:
                assert promotion.promote(params).action == "already_champion", name
                continue
            with pytest.raises(registry.RegistryError, match="was rolled back"):
                promotion.promote(params)
        aliases, tags, after = _state(params)
        assert after is None
        assert aliases == {"challenger": "2", "champion": "1"}, name
        assert (
            tags["2"][promotion.ROLLED_BACK_TAG] == "true"
            and tags["2"]["promotion.action"] == "rolled_back_to_1"
        )
        assert promotion.ROLLED_BACK_TAG not in tags["1"], name


@pytest.mark.slow  # processes that import MLflow, or a new tracking store: seconds each
def test_rollback_refuses_a_champion_that_is_also_previous(tmp_path):
    """The state an interrupted promote of older versions could leave: rolling back would mark the champion."""
    from registry_kill_driver import setup_model

    params = params_for(tmp_path, "same-twice")
    setup_model(params, "promote")
    registry.open_client(params).set_registered_model_alias("same-twice", registry.PREVIOUS, "1")
    with pytest.raises(registry.RegistryError, match=r"nothing to roll back to \(champion 1, previous 1\)"):
        promotion.rollback(params)
    assert promotion.ROLLED_BACK_TAG not in _state(params)[1]["1"]


FIRST_USE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from magicid import promotion, registry
    from magicid.config import load_params
    from magicid.training.tracking import RunTracker

    store, go = Path(sys.argv[1]), Path(sys.argv[2])
    params = load_params(None, [f"tracking.uri=sqlite:///{store / 'mlruns.db'}",
                                f"tracking.artifact_root={store / 'mlartifacts'}", "tracking.experiment=first-use"])
    while not go.exists():  # both processes start using the database within milliseconds of each other
        time.sleep(0.01)
    tracker = RunTracker(params, enabled=True)
    tracker.start(None, "first-use")
    print("run", tracker.run_id, "aliases", registry.aliases(params))
    """
)


@pytest.mark.slow  # processes that import MLflow, or a new tracking store: seconds each
def test_first_use_of_a_new_tracking_database_by_two_processes(tmp_path):
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_USE, str(tmp_path), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(1.0)
    go.touch()
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err and out.startswith("run ")
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("first-use")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(out.split()[1] for out, _ in outputs)


def test_a_tracking_database_in_a_missing_folder_is_a_registry_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'no-such-folder' / 'mlruns.db'}"
    with pytest.raises(registry.RegistryError, match="cannot create .*mlruns.db.lock"):
        registry.tracking_client(uri)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.slow  # processes that import MLflow, or a new tracking store: seconds each
def test_promote_against_a_server_that_does_not_answer_stops_soon_with_exit_2(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "magicid", "--set", f"tracking.uri={uri}", "promote"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-2000:]
    # The CLI probes a configured server before the command starts (magicid/store_urls.py)...
    assert f"tracking.uri='{uri}': the tracking server does not answer" in done.stderr, done.stderr
    assert "no version with alias" not in done.stderr and "Traceback" not in done.stderr
    assert seconds < 30, f"promote waited {seconds:.0f} s"


def test_the_registry_itself_bounds_the_wait_on_a_server_that_stops_answering(tmp_path, monkeypatch):
    """...and a server that goes away after that probe meets the registry's own bounded wait: one RegistryError
    naming it, not MLflow's minutes of retries and a misleading "no version with alias"."""
    from magicid.config import load_params
    from magicid.promotion import promote
    from magicid.registry import RegistryError

    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # what the CLI sets unless the user did
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    start = time.monotonic()
    with pytest.raises(RegistryError, match=f"the tracking server did not answer at {uri}"):
        promote(load_params(None, [f"tracking.uri={uri}"]))
    assert time.monotonic() - start < 30
