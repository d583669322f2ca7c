"""Kill `promotion.promote` / `promotion.rollback` before each of their registry writes, one process per kill.

Run as a script: `python registry_kill_driver.py STORE_DIR KIND VARIANTS`. It imports MLflow and magicid once,
then for each kill point N forks a child that builds its own registered model (named `<kind>-<N>-<variant>`, one
per variant: the test finishes each one differently), then runs KIND with every registry write counted, and ends
itself with `os._exit` just before write N: no clean-up, no `finally`, as a SIGKILL would leave it. A first child
without a kill counts the writes. The parent never opens the store, so each child builds its own connections.
Prints one JSON line: `{"writes": W, "models": {name: {"kill_at": N, "exit": code}}}`.

Also a module: the test imports `setup_model`, `params_for` and the constants from here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

KILLED = 86  # a child's exit code when it ended itself before a write
SET_ID = "evalset-kill"
WRITES = (  # every MlflowClient method the registry uses to change a registered model, its versions or aliases
    "set_registered_model_alias",
    "delete_registered_model_alias",
    "set_model_version_tag",
    "delete_model_version_tag",
    "set_registered_model_tag",
    "delete_registered_model_tag",
)


def params_for(store: Path, model_name: str):
    from magicid.config import load_params

    return load_params(
        None,
        [
            f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
            f"tracking.artifact_root={store / 'artifacts'}",
            "tracking.experiment=kill-test",
            f"promotion.model_name={model_name}",
            "promotion.bootstrap.n_resamples=200",
            "promotion.compare=[id_similarity]",  # one comparison check: fewer identical tag writes to kill at
        ],
    )


def _items(id_sim: np.ndarray) -> pd.DataFrame:
    n = len(id_sim)
    return pd.DataFrame(
        {
            "item_id": [f"item-{i:03d}" for i in range(n)],
            "id_similarity": id_sim,
            "id_confusion_rate": np.full(n, 0.1),
            "face_detection_rate": np.full(n, 0.9),
        }
    )


def _version(params, table: pd.DataFrame) -> str:
    """A registered version with an evaluation table and alias `challenger` (no logged model: moves never load
    one; `register_adapter` would cost seconds a version)."""
    from magicid import registry

    client = registry.open_client(params)
    name = params.promotion.model_name
    run = client.create_run(registry.experiment_id(client, params))
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/magicid", run.info.run_id)
    client.set_registered_model_alias(name, registry.CHALLENGER, version.version)
    registry.log_eval_items(params, version, SET_ID, table)
    return str(version.version)


def setup_model(params, kind: str) -> None:
    """promote: version 1 champion, version 2 (better) challenger. rollback: version 2 promoted over 1."""
    from magicid import promotion

    base = np.random.default_rng(0).uniform(0.4, 0.8, size=30)
    _version(params, _items(base))
    assert promotion.promote(params).action == "first_champion"
    _version(params, _items(base + 0.1))
    if kind == "rollback":
        assert promotion.promote(params).action == "promoted"


def _count_writes(kill_at: int | None, counter: dict[str, int]) -> None:
    """Patch the client's write methods: count each call, end the process before call `kill_at`."""
    from mlflow import MlflowClient

    for method_name in WRITES:
        original = getattr(MlflowClient, method_name)

        def counted(self, *args, _original=original, **kwargs):
            counter["n"] += 1
            if counter["n"] == kill_at:
                os._exit(KILLED)
            return _original(self, *args, **kwargs)

        setattr(MlflowClient, method_name, counted)


def _child(store: Path, kind: str, model_name: str, kill_at: int | None, count_file: Path) -> None:
    from magicid import promotion

    params = params_for(store, model_name)
    setup_model(params, kind)
    counter = {"n": 0}
    _count_writes(kill_at, counter)
    if kind == "promote":
        assert promotion.promote(params).action == "promoted"
    else:
        assert promotion.rollback(params).action == "rolled_back"
    count_file.write_text(str(counter["n"]))


def _fork(store: Path, kind: str, model_name: str, kill_at: int | None) -> tuple[int, int | None]:
    count_file = store / f"{model_name}.writes"
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _child(store, kind, model_name, kill_at, count_file)
        except BaseException as exc:  # noqa: BLE001 - reported through the exit code and stderr
            print(f"{model_name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, int(count_file.read_text()) if code == 0 else None


def main() -> None:
    store, kind, variants = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    import magicid.registry  # noqa: F401 - imported once here, before the children fork

    code, writes = _fork(store, kind, f"{kind}-count", None)
    if code != 0 or not writes:
        raise SystemExit(f"the counting run of {kind} failed (exit {code})")
    models = {}
    for kill_at in range(1, writes + 1):
        for variant in variants:
            name = f"{kind}-{kill_at}-{variant}"
            models[name] = {"kill_at": kill_at, "exit": _fork(store, kind, name, kill_at)[0]}
    print(json.dumps({"writes": writes, "models": models}))


if __name__ == "__main__":
    main()
