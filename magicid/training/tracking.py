"""MLflow tracking of the training commands (`train`, `fit-backbone`): one client-API tracker, no global run state.

The client API (`MlflowClient`) rather than `mlflow.start_run`'s fluent API: a resumed run reopens its own run id,
and nothing leaks into other code's active run.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from magicid.config import Params


def flatten_params(params: Params) -> dict[str, str]:
    """`Params` as MLflow params: dotted keys -> string values."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", params.model_dump(mode="json"))
    return flat


class RunTracker:
    """MLflow logging for one run of `train` or `fit-backbone` (main process only; a no-op when not enabled).

    Metrics are buffered and sent in batches (`flush`, at checkpoints and at the end): a CPU step is faster than
    a SQLite round trip.
    """

    def __init__(self, params: Params, enabled: bool) -> None:
        self.params = params
        self.enabled = enabled
        self.run_id: str | None = None
        self._pending: list[Any] = []
        self._client = None

    def start(
        self,
        run_id: str | None,
        run_name: str,
        source_name: str = "magicid train",
        tags: dict[str, str] | None = None,
    ) -> bool:
        """Open `run_id` (a resumed run) or a new run named `run_name`, tagged with the command that made it
        (`source_name`) and `tags` (e.g. `mlflow.parentRunId`, to nest it under another run); True when a new run
        was created (params to log)."""
        if not self.enabled:
            return False
        from magicid.registry import experiment_id as tracking_experiment
        from magicid.registry import open_client

        # The registry's builder: the S3 endpoint applied, a new SQLite database created under its lock.
        self._client = client = open_client(self.params)
        experiment_id = tracking_experiment(client, self.params)
        if run_id is not None:
            try:
                client.get_run(run_id)
            except Exception:  # noqa: BLE001 - a run of another tracking store: start a new one
                run_id = None
        if run_id is None:
            run = client.create_run(
                experiment_id, run_name=run_name, tags={"mlflow.source.name": source_name, **(tags or {})}
            )
            run_id = run.info.run_id
            self.run_id = run_id
            self.log_params(flatten_params(self.params))
            return True
        client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        return False

    def log_params(self, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in values.items()]
        for start in range(0, len(items), 100):  # MLflow accepts up to 100 params a batch
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log_dataset(self, images_df, root: Path, version: str, origin: str) -> None:
        if not self.enabled:
            return
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        tags = [InputTag("mlflow.data.context", "training"), InputTag("version_origin", origin)]
        from mlflow.entities import Dataset

        with warnings.catch_warnings():  # schema-inference hints about integer columns and source resolution
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(images_df, source=str(root), name="idzoom", digest=version)
            # The client API takes entities: build one from the dataset's public config dict.
            config = dataset.to_dict()
        entity = Dataset(
            name=config["name"],
            digest=config["digest"],
            source_type=config["source_type"],
            source=config["source"],
            schema=config.get("schema"),
            profile=config.get("profile"),
        )
        self._client.log_inputs(self.run_id, datasets=[DatasetInput(entity, tags=tags)])
        self._client.set_tag(self.run_id, "dataset_version", version)

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            self._client.set_tag(self.run_id, key, value)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now, step) for key, value in values.items())

    def flush(self) -> None:
        if not self.enabled or not self._pending:
            return
        for start in range(0, len(self._pending), 1000):  # MLflow's log_batch limit
            self._client.log_batch(self.run_id, metrics=self._pending[start : start + 1000])
        self._pending = []

    def artifacts(self, local_dir: Path, artifact_path: str) -> None:
        if self.enabled:
            self._client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def end(self, status: str) -> None:
        if self.enabled and self.run_id is not None:
            self.flush()
            self._client.set_terminated(self.run_id, status=status)
