"""The promotion gate (DESIGN §5): whether the `challenger` version replaces the `champion`, and the alias moves.

Above `magicid.registry` (versions, aliases, the per-item evaluation tables stored with a version's run) and
`magicid.evaluation` (the paired bootstrap): neither imports this module.

- `promote` applies the gate of params.yaml `promotion:`:
  1. absolute thresholds on the challenger's means (the first model becomes champion only through these);
  2. against the champion, scored on the same evaluation set: for each `promotion.compare` metric, the paired
     bootstrap interval of the per-item differences (oriented so that > 0 is better); the check passes only
     when the interval's lower bound is >= -`tolerance`, so a challenger better on the mean but within the
     noise is not promoted, and neither is a lucky seed;
  3. reviewer minimums read from version tags that the review store exports (`REVIEW_TAGS`).
  Pass: `champion` moves to the challenger and the former champion gets `previous`. Fail: nothing moves.
  Either way the decision, each check's figures and its reason are tags on the challenger version.
  Re-running is idempotent (the gate is deterministic; a challenger that is already champion is left alone).
- `rollback` moves `champion` back to `previous` and marks the demoted version, so it is not re-promoted.
- Both record their alias move before its first write and delete the record after its last (`AliasMove`,
  registered-model tag `magicid.pending_move`); each of them first finishes a move a killed run left recorded.
  MLflow errors become `RegistryError`s naming the tracking URI (`registry.store_errors`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from magicid.config import Params, PromotionParams
from magicid.evaluation.metrics import HIGHER_IS_BETTER, paired_bootstrap
from magicid.registry import (
    CHALLENGER,
    CHAMPION,
    EVAL_SET_TAG,
    NOT_FOUND_CODES,
    PREVIOUS,
    RegistryError,
    alias_version,
    load_eval_items,
    open_client,
    store_errors,
)
from magicid.reviews.export import (
    TAG_CHAMPION_VERSION,
    TAG_MEAN_OVERALL,
    TAG_N_PAIRS,
    TAG_N_RATINGS,
    TAG_WIN_RATE,
    TAG_WIN_RATE_LO,
)

ROLLED_BACK_TAG = "promotion.rolled_back"

# Reviewer aggregates as the review store writes them on a model version (`magicid review-export`): the
# names are the store's own constants, so the gate and the store cannot drift apart.
REVIEW_TAGS = {
    "n_ratings": TAG_N_RATINGS,
    "mean_score": TAG_MEAN_OVERALL,
    "n_comparisons": TAG_N_PAIRS,
    "win_rate": TAG_WIN_RATE,
    "win_rate_low": TAG_WIN_RATE_LO,
    "win_rate_vs": TAG_CHAMPION_VERSION,  # the champion version the pairwise judgements were made against
}


# ---------------------------------------------------------------------------------------------------------
# 1. The gate
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Check:
    """One gate check: its name, whether it passed, its figures and the reason in words."""

    name: str
    passed: bool
    figures: dict[str, float | str]
    reason: str

    def tag_value(self) -> str:
        return json.dumps({"passed": self.passed, "reason": self.reason, **self.figures}, sort_keys=True)


@dataclasses.dataclass
class GateDecision:
    """What `promote` decided for a challenger version."""

    model_name: str
    version: str
    champion: str | None
    passed: bool
    action: str  # promoted | first_champion | kept | already_champion | rolled_back
    checks: list[Check]
    recovered: str | None = None  # an interrupted move this call finished first, in words

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.reason}" for c in self.checks if not c.passed]


def _mean(items: pd.DataFrame, metric: str) -> float:
    if metric not in items.columns:
        return float("nan")
    values = pd.to_numeric(items[metric], errors="coerce").to_numpy(dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def absolute_checks(items: pd.DataFrame, cfg: PromotionParams) -> list[Check]:
    """Plain thresholds on the challenger's means. A threshold at its neutral value always passes."""
    rules = [
        ("min_id_similarity", "id_similarity", cfg.min_id_similarity, True, -1.0),
        ("max_id_confusion", "id_confusion_rate", cfg.max_id_confusion, False, 1.0),
        ("min_detection_rate", "face_detection_rate", cfg.min_detection_rate, True, 0.0),
    ]
    if cfg.max_landmark_nme is not None:
        rules.append(("max_landmark_nme", "landmark_nme", cfg.max_landmark_nme, False, math.inf))
    checks = []
    for name, metric, threshold, higher, neutral in rules:
        value = _mean(items, metric)
        figures = {"value": value, "threshold": threshold}
        if not math.isfinite(value):
            passed = (threshold <= neutral) if higher else (threshold >= neutral)
            reason = f"{metric} undefined on this eval set (no scored face)" + (
                "; threshold is neutral" if passed else ""
            )
        else:
            passed = value >= threshold if higher else value <= threshold
            reason = (
                f"{metric} {value:.4f} {'>=' if higher else '<='} {threshold:g}"
                if passed
                else (f"{metric} {value:.4f} {'<' if higher else '>'} {threshold:g}")
            )
        checks.append(Check(name, bool(passed), figures, reason))
    return checks


def comparison_checks(challenger: pd.DataFrame, champion: pd.DataFrame, cfg: PromotionParams) -> list[Check]:
    """Paired bootstrap of challenger vs champion per `cfg.compare` metric, on the items both were scored on."""
    merged = challenger.merge(champion, on="item_id", suffixes=("_challenger", "_champion"))
    checks = []
    missing_items = len(set(challenger["item_id"]) ^ set(champion["item_id"]))
    for metric in cfg.compare:
        name = f"vs_champion_{metric}"
        if missing_items or f"{metric}_challenger" not in merged.columns:
            checks.append(Check(name, False, {"unpaired_items": float(missing_items)},
                                f"{metric}: challenger and champion were not scored on the same items"))  # fmt: skip
            continue
        a = pd.to_numeric(merged[f"{metric}_challenger"], errors="coerce").to_numpy(float)
        b = pd.to_numeric(merged[f"{metric}_champion"], errors="coerce").to_numpy(float)
        if not HIGHER_IS_BETTER[metric]:
            a, b = -a, -b  # oriented: a positive difference is an improvement
        boot = paired_bootstrap(a, b, cfg.bootstrap.n_resamples, cfg.bootstrap.confidence, cfg.bootstrap.seed)
        figures = {**boot, "tolerance": cfg.tolerance, "confidence": cfg.bootstrap.confidence}
        if boot["n_items"] == 0:
            # Nothing to pair. A champion that scores no item on this metric (it drew no face to score) has no
            # figure to defend, so the challenger's absolute floor decides; a challenger that scores none has lost
            # what the champion had.
            vacuous = bool(np.isfinite(a).any()) and not np.isfinite(b).any()
            reason = (
                f"{metric}: the champion scores no item (the absolute floor decides)"
                if vacuous
                else f"{metric}: no item scored by both models"
            )
            checks.append(Check(name, vacuous, figures, reason))
            continue
        passed = boot["ci_low"] >= -cfg.tolerance
        interval = f"[{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}]"
        reason = (
            f"{metric} difference {boot['mean_diff']:+.4f} (better > 0), {cfg.bootstrap.confidence:.0%} CI "
            f"{interval} {'inside' if passed else 'reaches below'} -tolerance {-cfg.tolerance:g}"
        )
        checks.append(Check(name, bool(passed), figures, reason))
    return checks


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def reviewer_checks(tags: dict[str, str], champion: str | None, cfg: PromotionParams) -> list[Check]:
    """Reviewer minimums from the challenger's version tags (`REVIEW_TAGS`)."""
    n_ratings = _tag_float(tags, REVIEW_TAGS["n_ratings"]) or 0.0
    checks = [
        Check(
            "min_ratings",
            n_ratings >= cfg.min_ratings,
            {"value": n_ratings, "threshold": cfg.min_ratings},
            f"{n_ratings:g} ratings {'>=' if n_ratings >= cfg.min_ratings else '<'} {cfg.min_ratings}",
        )  # fmt: skip
    ]
    mean_score = _tag_float(tags, REVIEW_TAGS["mean_score"])
    if cfg.min_rating > 0 and mean_score is None:
        checks.append(Check("min_rating", False, {"threshold": cfg.min_rating},
                            "no mean reviewer score on this version (rate its generations)"))  # fmt: skip
    elif mean_score is not None or cfg.min_rating > 0:
        passed = mean_score >= cfg.min_rating
        checks.append(Check("min_rating", passed, {"value": mean_score, "threshold": cfg.min_rating},
                            f"mean score {mean_score:.3f} {'>=' if passed else '<'} {cfg.min_rating:g}"))  # fmt: skip
    if cfg.min_win_rate is not None and champion is not None:
        low = _tag_float(tags, REVIEW_TAGS["win_rate_low"])
        n = _tag_float(tags, REVIEW_TAGS["n_comparisons"]) or 0.0
        against = tags.get(REVIEW_TAGS["win_rate_vs"])
        figures = {"win_rate_low": low if low is not None else float("nan"), "n_comparisons": n,
                   "threshold": cfg.min_win_rate, "against": str(against)}  # fmt: skip
        if low is None or against != str(champion):
            checks.append(Check("min_win_rate", False, figures,
                                f"no pairwise win rate against champion version {champion} (compare them blind)"))  # fmt: skip
        else:
            passed = n >= cfg.min_comparisons and low >= cfg.min_win_rate
            checks.append(Check("min_win_rate", passed, figures,
                                f"win rate lower bound {low:.3f} vs {cfg.min_win_rate:g} over {n:g} comparisons "
                                f"(min {cfg.min_comparisons})"))  # fmt: skip
    return checks


def promote(params: Params) -> GateDecision:
    """Run the promotion gate on the `challenger` version; move `champion` when it passes.

    An alias move that an earlier `promote` or `rollback` left unfinished (killed) is finished first.

    Raises:
        RegistryError: no challenger; the challenger was rolled back; it (or the champion) has no evaluation on
            the challenger's eval set (the message says which `magicid evaluate` to run); the tracking store
            cannot be reached.
    """
    with store_errors(params):
        client = open_client(params)
        finished = finish_pending_move(client, params.promotion.model_name)
        decision = _promote(client, params)
        decision.recovered = finished.describe() if finished else None
        return decision


def _promote(client, params: Params) -> GateDecision:
    cfg = params.promotion
    name = cfg.model_name
    challenger = alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(
            f"model {name!r} has no version with alias {CHALLENGER!r} in {params.tracking.uri}: "
            "train and register one (`magicid train`)"
        )
    champion = alias_version(client, name, CHAMPION)
    version = str(challenger.version)
    champion_version = str(champion.version) if champion is not None else None
    if champion_version == version:
        return GateDecision(name, version, champion_version, True, "already_champion", [])
    tags = dict(challenger.tags)
    if tags.get(ROLLED_BACK_TAG) == "true":
        raise RegistryError(
            f"{name} version {challenger.version} was rolled back; register a new version to promote"
        )
    set_id = tags.get(EVAL_SET_TAG)
    if not set_id:
        raise RegistryError(
            f"{name} version {challenger.version} has no evaluation: run "
            f"`magicid evaluate --model models:/{name}@{CHALLENGER}`"
        )
    items = load_eval_items(params, challenger, set_id)
    if items is None:
        raise RegistryError(
            f"{name} version {challenger.version}: eval table for set {set_id} not found in its run"
        )
    checks = absolute_checks(items, cfg)
    if champion is not None:
        champion_items = load_eval_items(params, champion, set_id)
        if champion_items is None:
            raise RegistryError(
                f"champion {name} version {champion.version} was not scored on eval set {set_id}: run "
                f"`magicid evaluate --model models:/{name}@{CHAMPION}` with the same params first"
            )
        checks += comparison_checks(items, champion_items, cfg)
    checks += reviewer_checks(tags, champion_version, cfg)
    passed = all(c.passed for c in checks)
    action = ("promoted" if champion is not None else "first_champion") if passed else "kept"
    decision = GateDecision(name, version, champion_version, passed, action, checks)
    # The checks' figures first: they move nothing, so a kill here leaves a state the next run simply redoes.
    for check in checks:
        _set_version_tag(client, name, version, f"promotion.check.{check.name}", check.tag_value())
    if not passed:
        _write_summary_tags(client, decision, set_id)
        return decision
    move = AliasMove("promote", name, to=version, former=champion_version, action=action, eval_set=set_id)
    _record_move(client, move)
    _apply_move(client, move)
    return decision


def _set_version_tag(client, name: str, version: str, key: str, value: str) -> None:
    client.set_model_version_tag(name, version, key, value[:5000])


def _write_summary_tags(client, decision: GateDecision, set_id: str) -> None:
    """The decision in words on the challenger; `promotion.decision` last, so it is never ahead of the rest."""
    values = {
        "promotion.against": decision.champion or "none",
        "promotion.eval_set": set_id,
        "promotion.reasons": "; ".join(decision.reasons) or "all checks passed",
        "promotion.action": decision.action,
        "promotion.decision": "pass" if decision.passed else "fail",
    }
    for key, value in values.items():
        _set_version_tag(client, decision.model_name, decision.version, key, value)


def rollback(params: Params) -> GateDecision:
    """Move `champion` back to the `previous` version; the demoted version is tagged and loses `previous`.

    An alias move that an earlier `promote` or `rollback` left unfinished (killed) is finished first.

    Raises:
        RegistryError: there is no champion or no previous version (or they are the same version); the tracking
            store cannot be reached.
    """
    with store_errors(params):
        client = open_client(params)
        name = params.promotion.model_name
        finished = finish_pending_move(client, name)
        if finished is not None and finished.kind == "rollback":  # the rollback asked for again: now done
            return GateDecision(
                name, finished.former, finished.to, True, "rolled_back", [], finished.describe()
            )
        champion = alias_version(client, name, CHAMPION)
        previous = alias_version(client, name, PREVIOUS)
        if champion is None or previous is None or str(champion.version) == str(previous.version):
            raise RegistryError(
                f"model {name!r}: nothing to roll back to (champion {champion.version if champion else 'none'}, "
                f"previous {previous.version if previous else 'none'})"
            )
        demoted, restored = str(champion.version), str(previous.version)
        move = AliasMove("rollback", name, to=restored, former=demoted, action=f"rolled_back_to_{restored}")
        _record_move(client, move)
        _apply_move(client, move)
        recovered = finished.describe() if finished else None
        return GateDecision(name, demoted, restored, True, "rolled_back", [], recovered)


# ---------------------------------------------------------------------------------------------------------
# 2. Alias moves that survive a kill
# ---------------------------------------------------------------------------------------------------------
# A move writes several registry entries (aliases, tags), and the store has no transaction across them. So the
# move is recorded first, as one registered-model tag (one atomic write), then each write is made (each one
# idempotent: setting an alias or tag to the value it has changes nothing), and the record is deleted last.
# Whoever finds a record (every promote and rollback looks first) makes all the writes again: a move that was
# decided is finished, whatever write the kill came before. Before the record exists nothing has moved.

PENDING_MOVE_TAG = "magicid.pending_move"


@dataclasses.dataclass(frozen=True)
class AliasMove:
    """One decided alias move of registered model `model_name`.

    promote: `champion` -> `to`, `previous` -> `former` (the replaced champion; None for the first champion), and
    the decision tags on `to` (`action`: promoted | first_champion; `eval_set`).
    rollback: `champion` -> `to` (the previous version), `previous` removed, `former` (the demoted champion)
    tagged rolled back (`action`: rolled_back_to_<to>).
    """

    kind: str
    model_name: str
    to: str
    former: str | None
    action: str
    eval_set: str | None = None

    def record(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> AliasMove:
        try:
            fields = json.loads(text)
            move = cls(**fields)
            if move.kind not in ("promote", "rollback") or not str(move.to).isdigit():
                raise ValueError(f"kind {move.kind!r}, to {move.to!r}")
        except (ValueError, TypeError) as exc:
            raise RegistryError(
                f"registered-model tag {PENDING_MOVE_TAG!r} does not hold a move this version can finish ({exc}): "
                f"set the aliases by hand, then delete the tag (MlflowClient().delete_registered_model_tag)"
            ) from exc
        return move

    def describe(self) -> str:
        if self.kind == "promote":
            return (
                f"an interrupted promote of version {self.to} (champion was {self.former or 'none'}) finished"
            )
        return f"an interrupted rollback from version {self.former} to {self.to} finished"


def _record_move(client, move: AliasMove) -> None:
    client.set_registered_model_tag(move.model_name, PENDING_MOVE_TAG, move.record())


def _apply_move(client, move: AliasMove) -> None:
    """Every write of `move`, in an order whose every prefix is safe to find: readers of `champion` see the old
    version until the one write that switches it, and the record goes last."""
    name = move.model_name
    if move.kind == "promote":
        if move.former is not None:
            client.set_registered_model_alias(name, PREVIOUS, move.former)
        client.set_registered_model_alias(name, CHAMPION, move.to)
        decision = GateDecision(name, move.to, move.former, True, move.action, [])
        _write_summary_tags(client, decision, move.eval_set or "none")
    else:
        client.set_registered_model_alias(name, CHAMPION, move.to)
        client.delete_registered_model_alias(name, PREVIOUS)
        _set_version_tag(client, name, move.former, ROLLED_BACK_TAG, "true")
        _set_version_tag(client, name, move.former, "promotion.action", move.action)
    client.delete_registered_model_tag(name, PENDING_MOVE_TAG)


def pending_move(client, model_name: str) -> AliasMove | None:
    """The move recorded on `model_name` and not finished, or None."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(model_name).tags
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND_CODES:
            return None
        raise
    text = tags.get(PENDING_MOVE_TAG)
    return AliasMove.parse(text) if text else None


def finish_pending_move(client, model_name: str) -> AliasMove | None:
    """Finish the move a killed promote/rollback left recorded on `model_name`; returns it (None: none was)."""
    move = pending_move(client, model_name)
    if move is None:
        return None
    if move.model_name != model_name:
        raise RegistryError(
            f"registered model {model_name!r}: its {PENDING_MOVE_TAG!r} tag names model {move.model_name!r}; "
            "set the aliases by hand, then delete the tag"
        )
    _apply_move(client, move)
    return move


def run_tags_for_decision(decision: GateDecision) -> dict[str, Any]:
    """The decision as printable `name: value` lines (CLI)."""
    out: dict[str, Any] = {
        "model": decision.model_name,
        "version": decision.version,
        "champion_before": decision.champion or "none",
        "decision": "pass" if decision.passed else "fail",
        "action": decision.action,
    }
    if decision.recovered:
        out["recovered"] = decision.recovered
    for check in decision.checks:
        out[f"check.{check.name}"] = f"{'pass' if check.passed else 'FAIL'}: {check.reason}"
    return out
