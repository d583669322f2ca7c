"""Prefect flow `promote`: the promotion gate on the `challenger` version (`magicid promote`).

Not cached: the gate reads the registry's current aliases and reviewer tags, which change between runs; it is
deterministic and idempotent itself. The artifact is the decision with each check's figures and reason.

Run locally: `python -m flows.promote`.
"""

from __future__ import annotations

import argparse

from prefect import flow, get_run_logger, task

from flows.common import DEFAULT_PARAMS_PATH, flow_params, markdown_table, publish, retry_on_io
from magicid.config import Params


@task(name="promotion-gate", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_io)
def gate(params: Params) -> dict:
    from magicid.promotion import promote

    decision = promote(params)
    return {
        "model": decision.model_name,
        "version": decision.version,
        "champion_before": decision.champion,
        "passed": decision.passed,
        "action": decision.action,
        "recovered": decision.recovered,
        "checks": [(c.name, "pass" if c.passed else "FAIL", c.reason) for c in decision.checks],
    }


def decision_markdown(decision: dict, params: Params) -> str:
    head = markdown_table(
        [
            ("model", decision["model"]),
            ("challenger version", decision["version"]),
            ("champion before", decision["champion_before"] or "none"),
            ("decision", "pass" if decision["passed"] else "fail"),
            ("action", decision["action"]),
            ("interrupted move finished first", decision.get("recovered") or "none"),
            ("registry", f"`models:/{decision['model']}/{decision['version']}` in {params.tracking.uri}"),
        ],
        ("gate", "value"),
    )
    checks = (
        markdown_table(decision["checks"], ("check", "result", "reason")) if decision["checks"] else "(none)"
    )
    return "# Promotion gate\n\n" + head + "\n\n## Checks\n\n" + checks


@flow(name="promote")
def promote_flow(
    params_path: str | None = DEFAULT_PARAMS_PATH,
    overrides: list[str] | None = None,
    params: Params | None = None,
) -> dict:
    """Run the gate; returns the decision (champion moves only on pass).
    The params: `params_path` + `overrides`, or `params` a parent flow loaded (`flows.common.flow_params`)."""
    params = flow_params(params_path, overrides, params)
    decision = gate(params)
    publish("promotion-decision", decision_markdown(decision, params), "the promotion gate's decision")
    get_run_logger().info(
        "promotion gate: %s (%s)", "pass" if decision["passed"] else "fail", decision["action"]
    )
    return decision


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(promote_flow(overrides=args.overrides))


if __name__ == "__main__":
    main()
