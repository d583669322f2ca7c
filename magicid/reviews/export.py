"""Review aggregates as MLflow model-version tags (package docstring, contract 2): the `TAG_*` names the
promotion gate reads, writing them (`export_review_tags`) and reading them back typed (`parse_review_tags`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from magicid.errors import ReviewError
from magicid.reviews.statistics import ScoreSummary, VersionAggregate
from magicid.reviews.store import ReviewStore
from magicid.reviews.tables import utc_now

# MLflow model-version tags (contract with the promotion gate, magicid/promotion.py).
TAG_N_RATINGS = "review.n_ratings"  # ratings of this version's generations (int)
TAG_N_REVIEWERS = "review.n_reviewers"  # distinct reviewers who rated it (int)
TAG_N_RATED_GENERATIONS = "review.n_rated_generations"  # generations with at least one rating (int)
TAG_MEAN_OVERALL = "review.mean_overall"  # mean overall score, 1-5 (float)
TAG_MEAN_OVERALL_LO = "review.mean_overall_lo"  # 95% t interval of that mean
TAG_MEAN_OVERALL_HI = "review.mean_overall_hi"
TAG_MEAN_IDENTITY = "review.mean_identity"  # mean identity-fidelity score, 1-5 (float)
TAG_MEAN_IDENTITY_LO = "review.mean_identity_lo"
TAG_MEAN_IDENTITY_HI = "review.mean_identity_hi"
TAG_WIN_RATE = "review.win_rate_vs_champion"  # (wins + ties/2) / pairs against the champion (float)
TAG_WIN_RATE_LO = "review.win_rate_lo"  # 95% Wilson interval of that rate
TAG_WIN_RATE_HI = "review.win_rate_hi"
TAG_N_PAIRS = "review.n_pairs"  # blind pairs judged against the champion (int)
TAG_CHAMPION_VERSION = "review.champion_version"  # the champion version the win rate is against
TAG_EXPORTED_AT = "review.exported_at"  # UTC ISO time of the export
WIN_RATE_TAGS = (TAG_WIN_RATE, TAG_WIN_RATE_LO, TAG_WIN_RATE_HI, TAG_CHAMPION_VERSION)


def review_tags(aggregate: VersionAggregate, champion: str | None) -> dict[str, str]:
    """The `TAG_*` values for one version's aggregate (intervals only where they exist)."""
    tags = {
        TAG_N_RATINGS: str(aggregate.n_ratings),
        TAG_N_REVIEWERS: str(aggregate.n_reviewers),
        TAG_N_RATED_GENERATIONS: str(aggregate.n_rated_generations),
    }
    for summary, (mean_tag, lo_tag, hi_tag) in (
        (aggregate.overall, (TAG_MEAN_OVERALL, TAG_MEAN_OVERALL_LO, TAG_MEAN_OVERALL_HI)),
        (aggregate.identity, (TAG_MEAN_IDENTITY, TAG_MEAN_IDENTITY_LO, TAG_MEAN_IDENTITY_HI)),
    ):
        if summary.mean is not None:
            tags[mean_tag] = repr(summary.mean)
        if summary.lo is not None:
            tags[lo_tag], tags[hi_tag] = repr(summary.lo), repr(summary.hi)
    win = aggregate.win_vs_champion
    tags[TAG_N_PAIRS] = str(win.n if win is not None else 0)
    if win is not None and champion is not None:
        tags[TAG_WIN_RATE] = repr(win.rate)
        tags[TAG_WIN_RATE_LO], tags[TAG_WIN_RATE_HI] = repr(win.lo), repr(win.hi)
        tags[TAG_CHAMPION_VERSION] = champion
    return tags


def export_review_tags(
    store: ReviewStore,
    model_name: str,
    versions: Sequence[str] | None = None,
    *,
    champion: str | None = None,
    client: Any = None,
) -> dict[str, dict[str, str]]:
    """Write each version's review aggregates as MLflow model-version tags (`TAG_*`).

    Args:
        store: the review store.
        model_name: the registered model (params `promotion.model_name`).
        versions: which versions (default: every version with registered generations).
        champion: the version win rates are against (default: the model's `champion` alias, if set).
        client: an `mlflow.MlflowClient` (default: `registry.tracking_client` of the current tracking URI).

    Returns:
        version -> the tags written. Tags of a statistic that no longer exists (a win rate without pairs,
        an interval below 2 ratings) are deleted, so a stale value never reaches the gate.

    Raises:
        ReviewError: the registered model or one of the versions does not exist in the registry.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    # Imported here: the registry loads MLflow's pyfunc machinery, which the review app's pages do not need.
    from magicid.registry import registry_roles, tracking_client

    client = client if client is not None else tracking_client(mlflow.get_tracking_uri())
    if champion is None:
        champion = registry_roles(client, model_name).get("champion")
    aggregates = store.aggregates(champion=champion)
    versions = list(versions) if versions is not None else list(aggregates)
    all_tags = (
        TAG_N_RATINGS,
        TAG_N_REVIEWERS,
        TAG_N_RATED_GENERATIONS,
        TAG_MEAN_OVERALL,
        TAG_MEAN_OVERALL_LO,
        TAG_MEAN_OVERALL_HI,
        TAG_MEAN_IDENTITY,
        TAG_MEAN_IDENTITY_LO,
        TAG_MEAN_IDENTITY_HI,
        TAG_N_PAIRS,
        *WIN_RATE_TAGS,
    )
    written = {}
    for version in versions:
        try:
            current = client.get_model_version(model_name, version).tags
        except MlflowException as exc:
            raise ReviewError(
                f"model {model_name!r} version {version!r} is not in the MLflow registry: register it "
                "(magicid train/evaluate) or export other versions"
            ) from exc
        aggregate = aggregates.get(version) or VersionAggregate(
            version, 0, 0, 0, 0, ScoreSummary(0, None, None, None), ScoreSummary(0, None, None, None)
        )
        tags = review_tags(aggregate, champion)
        tags[TAG_EXPORTED_AT] = utc_now().isoformat()
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version, key, value)
        for key in all_tags:
            if key not in tags and key in current:
                client.delete_model_version_tag(model_name, version, key)
        written[version] = tags
    return written


def parse_review_tags(tags: dict[str, str]) -> dict[str, float | int | str]:
    """The review tags of a model version (`ModelVersion.tags`), typed: counts int, statistics float,
    the champion version str. Missing tags are absent (the gate decides what absence means)."""
    ints = {TAG_N_RATINGS, TAG_N_REVIEWERS, TAG_N_RATED_GENERATIONS, TAG_N_PAIRS}
    out: dict[str, float | int | str] = {}
    for key, value in tags.items():
        if not key.startswith("review.") or key == TAG_EXPORTED_AT:
            continue
        out[key] = int(value) if key in ints else value if key == TAG_CHAMPION_VERSION else float(value)
    return out
