"""Review store speed and concurrency on SQLite (magicid.reviews.ReviewStore).

A store with 1,000 generations (2 model versions x 500 cases), 20 reviewers and 10,000 ratings (each reviewer
rates all 500 generations of one version, alternating versions), plus 2,000 blind judgements. Prints `name: value` lines:
- `reviews_queue_ms`: one reviewer's queue of unrated generations of a version (median).
- `reviews_aggregate_ms`: every version's aggregates (counts, means with t intervals, flag counts, win rate
  against the champion with its Wilson interval) (median).
- `reviews_concurrent_lost`: ratings and judgements missing after 4 writer processes wrote at once into one
  SQLite file (a write that raised counts as lost). Must be 0.
Targets: <= 50 ms each on SQLite; 0 lost. `--quick`: fewer timing repeats and concurrent writes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from timing import median_seconds

from magicid import reviews
from magicid.reviews import GenerationRecord, JudgementRow, RatingFlagRow, RatingRow, ReviewStore

N_CASES = 500
VERSIONS = ("1", "2")
N_REVIEWERS = 20


def build_store(url: str) -> ReviewStore:
    """The benchmark store. Rows are bulk-inserted (setup, not timed) through the store's own tables."""
    store = ReviewStore(url)
    store.register_generations(
        GenerationRecord(
            generation_id=f"v{version}-{case:04d}",
            model_version=version,
            prompt=f"prompt {case}",
            seed=case,
            reference_paths=[f"refs/{case % 37}.png"],
            boxes=[(10.0, 10.0, 50.0, 50.0)],
            image_path=f"v{version}/{case:04d}.png",
            case_id=f"case-{case:04d}",
        )
        for version in VERSIONS
        for case in range(N_CASES)
    )
    reviewers_ = [f"reviewer{i:02d}" for i in range(N_REVIEWERS)]
    for name in reviewers_:
        store.ensure_reviewer(name)
    rng = random.Random(0)
    now = datetime.now(UTC)

    def fill(session) -> None:
        for index, name in enumerate(reviewers_):
            version = VERSIONS[index % 2]
            for case in range(N_CASES):
                rating = RatingRow(
                    reviewer=name,
                    generation_id=f"v{version}-{case:04d}",
                    model_version=version,
                    identity_score=rng.randint(1, 5),
                    overall_score=rng.randint(1, 5),
                    comment="",
                    created_at=now,
                    updated_at=now,
                )
                if rng.random() < 0.2:
                    rating.flags = [
                        RatingFlagRow(flag=rng.choice(reviews.ARTIFACT_FLAGS), model_version=version)
                    ]
                session.add(rating)
            for case in range(100):
                left, right = rng.sample(VERSIONS, 2)
                session.add(
                    JudgementRow(
                        reviewer=name,
                        pair_key=reviews.pair_key(f"v1-{case:04d}", f"v2-{case:04d}"),
                        case_id=f"case-{case:04d}",
                        prompt=f"prompt {case}",
                        seed=case,
                        left_generation_id=f"v{left}-{case:04d}",
                        right_generation_id=f"v{right}-{case:04d}",
                        left_version=left,
                        right_version=right,
                        choice=rng.choice(reviews.CHOICES),
                        created_at=now,
                        updated_at=now,
                    )
                )

    store._write(fill)
    return store


def writer(url: str, name: str, n_writes: int) -> int:
    """One writer process: rate n_writes generations (each rated twice: the second replaces the first) and
    judge as many pairs. Returns how many writes it saw succeed."""
    store = ReviewStore(url)
    store.ensure_reviewer(name)
    done = 0
    for index in range(n_writes):
        case = index % N_CASES
        for score in (2, 4):
            store.rate(name, f"v1-{case:04d}", identity_score=score, overall_score=score)
        store.judge(name, f"v1-{case:04d}", f"v2-{case:04d}", "left")
        done += 1
    store.close()
    return done


def concurrent_lost(url: str, n_writers: int, n_writes: int) -> int:
    context = multiprocessing.get_context("spawn")
    names = [f"writer{i}" for i in range(n_writers)]
    with context.Pool(n_writers) as pool:
        results = [pool.apply_async(writer, (url, name, n_writes)) for name in names]
        for result in results:
            try:
                result.get(timeout=600)
            except Exception as error:  # a failed write is a lost one; counted below
                print(f"# writer failed: {error!r}")
    store = ReviewStore(url)
    lost = 0
    for name in names:
        ratings, judgements = store.history(name)
        lost += n_writes - sum(r.identity_score == 4 for r in ratings)  # the re-rating must have won
        lost += n_writes - len(judgements)
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and concurrent writes")
    args = parser.parse_args()
    repeats = 5 if args.quick else 20
    n_writes = 25 if args.quick else 100

    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(f"sqlite:///{Path(tmp) / 'reviews.db'}")
        assert store.aggregates()["1"].n_ratings + store.aggregates()["2"].n_ratings == N_REVIEWERS * N_CASES
        # reviewer00 rated all of version 1 and nothing of version 2: its version-2 queue is all 500.
        assert len(store.queue("reviewer00", "2")) == N_CASES
        queue_s = median_seconds(lambda: store.queue("reviewer00", "2"), repeats, warmup=2)
        aggregate_s = median_seconds(lambda: store.aggregates(champion="1"), repeats, warmup=2)
        store.close()

        concurrent_url = f"sqlite:///{Path(tmp) / 'concurrent.db'}"
        seeded = ReviewStore(concurrent_url)
        seeded.register_generations(
            GenerationRecord(
                generation_id=f"v{version}-{case:04d}",
                model_version=version,
                prompt=f"prompt {case}",
                seed=case,
                image_path=f"v{version}/{case:04d}.png",
                case_id=f"case-{case:04d}",
            )
            for version in VERSIONS
            for case in range(n_writes)
        )
        seeded.close()
        lost = concurrent_lost(concurrent_url, 4, n_writes)

    print(f"reviews_queue_ms: {queue_s * 1000:.2f}")
    print(f"reviews_aggregate_ms: {aggregate_s * 1000:.2f}")
    print(f"reviews_concurrent_lost: {lost}")


if __name__ == "__main__":
    main()
