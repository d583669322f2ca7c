"""The review store: ratings and blind pairwise judgements in a SQL database, aggregated per model version."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, TypeVar

from sqlalchemy import (
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, aliased

from magicid.errors import ReviewError
from magicid.reviews.auth import check_reviewer_name
from magicid.reviews.manifest import GenerationRecord
from magicid.reviews.statistics import (
    VersionAggregate,
    WinRate,
    mean_interval,
    win_rate_from_counts,
)
from magicid.reviews.tables import (
    Base,
    GenerationRow,
    JudgementRow,
    RatingFlagRow,
    RatingRow,
    ReviewerRow,
    as_utc,
    utc_now,
)

SCORE_MIN, SCORE_MAX = 1, 5
# Artifact flags a reviewer can tick; a fixed vocabulary so that counts aggregate across reviewers.
ARTIFACT_FLAGS = (
    "distorted_face",
    "wrong_identity",
    "identity_swap",
    "extra_or_missing_face",
    "bad_hands_or_body",
    "blur_or_noise",
    "visible_seam",
    "other",
)
Choice = Literal["left", "right", "tie"]
CHOICES: tuple[str, ...] = ("left", "right", "tie")


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rating:
    reviewer: str
    generation_id: str
    model_version: str
    identity_score: int
    overall_score: int
    flags: tuple[str, ...]
    comment: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Judgement:
    reviewer: str
    case_id: str
    prompt: str
    seed: int
    left_generation_id: str
    right_generation_id: str
    left_version: str
    right_version: str
    choice: str
    updated_at: datetime


@dataclass(frozen=True)
class BlindPair:
    """Two versions' generations of one case (same prompt, seed, identities), not yet in a display order."""

    case_id: str
    first: GenerationRecord
    second: GenerationRecord


# ---------------------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------------------

_T = TypeVar("_T")


class ReviewStore:
    """Ratings and pairwise judgements in a SQL database (any SQLAlchemy URL; SQLite file by default).

    Writes are transactions retried on lock errors (SQLite: `BEGIN IMMEDIATE` under a busy timeout, WAL so
    readers never block the writer), so concurrent writers in several processes lose nothing. Creating a
    store creates the tables if missing.
    """

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0, max_retries: int = 20):
        self.url = url
        self.max_retries = max_retries
        self._sqlite = url.startswith("sqlite")
        if self._sqlite:
            database = url.split("///", 1)[1] if "///" in url else ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(
            url, connect_args={"timeout": busy_timeout_s} if self._sqlite else {}
        )
        if self._sqlite:
            self._configure_sqlite(busy_timeout_s)
        self._write(lambda session: Base.metadata.create_all(session.connection()))

    def _configure_sqlite(self, busy_timeout_s: float) -> None:
        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_connection, _record):
            # pysqlite's own transaction handling would BEGIN (deferred) behind SQLAlchemy's back; turn it
            # off and let the "begin" hook below say which kind of transaction starts.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @event.listens_for(self.engine, "begin")
        def _on_begin(connection):
            # A deferred transaction that reads and then writes can fail with SQLITE_BUSY without waiting
            # (another writer got in between); IMMEDIATE takes the write lock first, under the busy timeout.
            immediate = connection.get_execution_options().get("magicid_write", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions ----------------------------------------------------------------------------------

    def _write(self, work: Callable[[Session], _T]) -> _T:
        delay = 0.01
        for attempt in range(self.max_retries + 1):
            try:
                with self.engine.connect() as connection:
                    connection = connection.execution_options(magicid_write=True)
                    with Session(bind=connection) as session, session.begin():
                        return work(session)
            except OperationalError as exc:
                if attempt == self.max_retries or not _is_lock_error(exc):
                    raise
            except IntegrityError:
                # Two writers inserted the same (reviewer, item) at once on a non-SQLite database: the
                # retry finds the row the other wrote and updates it.
                if attempt == self.max_retries:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")

    def _read(self, work: Callable[[Session], _T]) -> _T:
        with Session(self.engine) as session:
            return work(session)

    # -- reviewers and generations ---------------------------------------------------------------------

    def ensure_reviewer(self, name: str) -> None:
        """Record a reviewer (idempotent); ratings and judgements must name a recorded reviewer."""
        check_reviewer_name(name, source="reviewer")

        def work(session: Session) -> None:
            if session.get(ReviewerRow, name) is None:
                session.add(ReviewerRow(name=name))

        self._write(work)

    def reviewers(self) -> list[str]:
        return self._read(lambda s: list(s.scalars(select(ReviewerRow.name).order_by(ReviewerRow.name))))

    def register_generations(self, records: Iterable[GenerationRecord]) -> int:
        """Insert or update generations from a manifest (idempotent). Returns how many were new.

        Raises:
            ReviewError: an already registered generation id now names another model version (its ratings
                would move to the wrong version).
        """
        records = list(records)

        def work(session: Session) -> int:
            existing = {
                row.generation_id: row
                for row in session.scalars(
                    select(GenerationRow).where(
                        GenerationRow.generation_id.in_([r.generation_id for r in records])
                    )
                )
            }
            new = 0
            for record in records:
                values = {
                    "model_version": record.model_version,
                    "case_id": record.resolved_case_id(),
                    "prompt": record.prompt,
                    "seed": record.seed,
                    "image_path": record.image_path,
                    "pre_diir_path": record.pre_diir_path,
                    "reference_paths": list(record.reference_paths),
                    "boxes": [list(b) for b in record.boxes],
                }
                row = existing.get(record.generation_id)
                if row is None:
                    session.add(GenerationRow(generation_id=record.generation_id, **values))
                    new += 1
                    continue
                if row.model_version != record.model_version:
                    raise ReviewError(
                        f"generation {record.generation_id!r} is registered for model version "
                        f"{row.model_version!r} but the manifest now says {record.model_version!r}: "
                        "generation ids must be stable; give the new generation a new id"
                    )
                for key, value in values.items():
                    setattr(row, key, value)
            return new

        return self._write(work)

    def generation(self, generation_id: str) -> GenerationRecord:
        row = self._read(lambda s: s.get(GenerationRow, generation_id))
        if row is None:
            raise ReviewError(f"unknown generation {generation_id!r}: register the manifest that lists it")
        return _record(row)

    def model_versions(self) -> list[str]:
        """Model versions with registered generations, numerically sorted where they are numbers."""
        versions = self._read(lambda s: list(s.scalars(select(GenerationRow.model_version).distinct())))
        return sorted(versions, key=_version_sort_key)

    def queue(
        self, reviewer: str, model_version: str, *, include_rated: bool = False, limit: int | None = None
    ) -> list[GenerationRecord]:
        """Generations of `model_version` that `reviewer` has not rated yet (all of them with include_rated),
        ordered by generation id."""
        g = GenerationRow
        # Plain columns, not ORM objects: the queue of a large evaluation set is read on every page view.
        query = select(*_GENERATION_COLUMNS).where(g.model_version == model_version)
        if not include_rated:
            rated = select(RatingRow.id).where(
                RatingRow.reviewer == reviewer, RatingRow.generation_id == g.generation_id
            )
            query = query.where(~rated.exists())
        query = query.order_by(g.generation_id).limit(limit)
        return self._read(lambda s: [_record_from_columns(row) for row in s.execute(query)])

    # -- ratings -----------------------------------------------------------------------------------------

    def rate(
        self,
        reviewer: str,
        generation_id: str,
        *,
        identity_score: int,
        overall_score: int,
        flags: Sequence[str] = (),
        comment: str = "",
    ) -> Rating:
        """Save `reviewer`'s rating of a generation; a second rating by the same reviewer replaces the first.

        Raises:
            ReviewError: unknown reviewer or generation, a score outside 1-5, an unknown flag.
        """
        for label, score in (("identity_score", identity_score), ("overall_score", overall_score)):
            if not (isinstance(score, int) and SCORE_MIN <= score <= SCORE_MAX):
                raise ReviewError(f"{label} must be an integer {SCORE_MIN}-{SCORE_MAX}, got {score!r}")
        unknown = sorted(set(flags) - set(ARTIFACT_FLAGS))
        if unknown:
            raise ReviewError(f"unknown artifact flags {unknown}: use some of {list(ARTIFACT_FLAGS)}")
        flags = tuple(sorted(set(flags)))

        def work(session: Session) -> Rating:
            self._require_reviewer(session, reviewer)
            generation = session.get(GenerationRow, generation_id)
            if generation is None:
                raise ReviewError(
                    f"unknown generation {generation_id!r}: register the manifest that lists it"
                )
            row = session.scalars(
                select(RatingRow).where(
                    RatingRow.reviewer == reviewer, RatingRow.generation_id == generation_id
                )
            ).one_or_none()
            now = utc_now()
            if row is None:
                row = RatingRow(
                    reviewer=reviewer,
                    generation_id=generation_id,
                    model_version=generation.model_version,
                    created_at=now,
                )
                session.add(row)
            row.identity_score = identity_score
            row.overall_score = overall_score
            row.comment = comment
            row.updated_at = now
            row.flags = [RatingFlagRow(flag=flag, model_version=generation.model_version) for flag in flags]
            session.flush()
            return _rating(row)

        return self._write(work)

    def rating(self, reviewer: str, generation_id: str) -> Rating | None:
        query = select(RatingRow).where(
            RatingRow.reviewer == reviewer, RatingRow.generation_id == generation_id
        )
        return self._read(lambda s: next((_rating(r) for r in s.scalars(query)), None))

    def history(self, reviewer: str) -> tuple[list[Rating], list[Judgement]]:
        """`reviewer`'s own ratings and judgements, newest first."""

        def work(session: Session):
            ratings = session.scalars(
                select(RatingRow).where(RatingRow.reviewer == reviewer).order_by(RatingRow.updated_at.desc())
            )
            judgements = session.scalars(
                select(JudgementRow)
                .where(JudgementRow.reviewer == reviewer)
                .order_by(JudgementRow.updated_at.desc())
            )
            return [_rating(r) for r in ratings], [_judgement(j) for j in judgements]

        return self._read(work)

    # -- blind pairs ------------------------------------------------------------------------------------

    def pairs(self, version_a: str, version_b: str) -> list[BlindPair]:
        """Cases that both versions generated (same case id), ordered by case id."""
        if version_a == version_b:
            raise ReviewError(f"a blind pair needs two different model versions, got {version_a!r} twice")
        a, b = aliased(GenerationRow), aliased(GenerationRow)
        query = (
            select(a, b)
            .join(b, a.case_id == b.case_id)
            .where(a.model_version == version_a, b.model_version == version_b)
            .order_by(a.case_id, a.generation_id, b.generation_id)
        )
        return self._read(
            lambda s: [BlindPair(ra.case_id, _record(ra), _record(rb)) for ra, rb in s.execute(query)]
        )

    def unjudged_pairs(self, reviewer: str, version_a: str, version_b: str) -> list[BlindPair]:
        """`pairs(version_a, version_b)` that `reviewer` has not judged yet."""
        judged = set(
            self._read(
                lambda s: list(
                    s.scalars(select(JudgementRow.pair_key).where(JudgementRow.reviewer == reviewer))
                )
            )
        )
        return [
            p
            for p in self.pairs(version_a, version_b)
            if pair_key(p.first.generation_id, p.second.generation_id) not in judged
        ]

    def judge(
        self, reviewer: str, left_generation_id: str, right_generation_id: str, choice: str
    ) -> Judgement:
        """Save `reviewer`'s blind choice between two generations of one case, shown left and right.

        A second judgement of the same pair by the same reviewer replaces the first.

        Raises:
            ReviewError: unknown reviewer or generation, a choice other than left/right/tie, the two
                generations from the same version or from different cases.
        """
        if choice not in CHOICES:
            raise ReviewError(f"choice must be one of {list(CHOICES)}, got {choice!r}")

        def work(session: Session) -> Judgement:
            self._require_reviewer(session, reviewer)
            left = session.get(GenerationRow, left_generation_id)
            right = session.get(GenerationRow, right_generation_id)
            for generation_id, row in ((left_generation_id, left), (right_generation_id, right)):
                if row is None:
                    raise ReviewError(
                        f"unknown generation {generation_id!r}: register the manifest that lists it"
                    )
            if left.model_version == right.model_version:
                raise ReviewError(
                    f"generations {left_generation_id!r} and {right_generation_id!r} are both model version "
                    f"{left.model_version!r}: a blind pair compares two versions"
                )
            if left.case_id != right.case_id:
                raise ReviewError(
                    f"generations {left_generation_id!r} and {right_generation_id!r} are different cases "
                    "(prompt, seed or identities differ): a blind pair compares the same case"
                )
            key = pair_key(left_generation_id, right_generation_id)
            row = session.scalars(
                select(JudgementRow).where(JudgementRow.reviewer == reviewer, JudgementRow.pair_key == key)
            ).one_or_none()
            now = utc_now()
            if row is None:
                row = JudgementRow(reviewer=reviewer, pair_key=key, created_at=now)
                session.add(row)
            row.case_id = left.case_id
            row.prompt = left.prompt
            row.seed = left.seed
            row.left_generation_id, row.right_generation_id = left_generation_id, right_generation_id
            row.left_version, row.right_version = left.model_version, right.model_version
            row.choice = choice
            row.updated_at = now
            session.flush()
            return _judgement(row)

        return self._write(work)

    # -- aggregates -------------------------------------------------------------------------------------

    def win_rate(self, version: str, opponent: str) -> WinRate | None:
        """`version`'s blind win rate against `opponent` over all reviewers (None without judgements)."""
        j = JudgementRow
        query = (
            select(j.left_version, j.choice, func.count())
            .where(
                ((j.left_version == version) & (j.right_version == opponent))
                | ((j.left_version == opponent) & (j.right_version == version))
            )
            .group_by(j.left_version, j.choice)
        )
        wins = losses = ties = 0
        for left_version, choice, count in self._read(lambda s: list(s.execute(query))):
            if choice == "tie":
                ties += count
            elif (choice == "left") == (left_version == version):
                wins += count
            else:
                losses += count
        return win_rate_from_counts(version, opponent, wins, losses, ties) if wins + losses + ties else None

    def aggregates(self, champion: str | None = None) -> dict[str, VersionAggregate]:
        """Per model version: counts, mean scores with 95% intervals, flag counts, and, when `champion` is
        given, the blind win rate against it (None for the champion itself and without judgements)."""
        r, f, j = RatingRow, RatingFlagRow, JudgementRow

        def work(session: Session):
            generations = dict(
                session.execute(
                    select(GenerationRow.model_version, func.count()).group_by(GenerationRow.model_version)
                ).all()
            )
            scores = session.execute(
                select(
                    r.model_version,
                    func.count(),
                    func.count(r.generation_id.distinct()),
                    func.sum(r.overall_score),
                    func.sum(r.overall_score * r.overall_score),
                    func.sum(r.identity_score),
                    func.sum(r.identity_score * r.identity_score),
                ).group_by(r.model_version)
            ).all()
            # A separate query so that each distinct count walks its own covering index in order.
            reviewer_counts = dict(
                session.execute(
                    select(r.model_version, func.count(r.reviewer.distinct())).group_by(r.model_version)
                ).all()
            )
            flags = session.execute(
                select(f.model_version, f.flag, func.count()).group_by(f.model_version, f.flag)
            )
            judged = []
            if champion is not None:
                judged = session.execute(
                    select(j.left_version, j.right_version, j.choice, func.count())
                    .where((j.left_version == champion) | (j.right_version == champion))
                    .group_by(j.left_version, j.right_version, j.choice)
                ).all()
            return generations, scores, reviewer_counts, flags.all(), judged

        generations, scores, reviewer_counts, flags, judged = self._read(work)
        by_version = {row[0]: row[1:] for row in scores}
        flag_counts: dict[str, dict[str, int]] = {}
        for version, flag, count in flags:
            flag_counts.setdefault(version, {})[flag] = count
        outcomes: dict[str, list[int]] = {}  # challenger version -> [wins, losses, ties] against the champion
        for left_version, right_version, choice, count in judged:
            version = right_version if left_version == champion else left_version
            if version == champion:
                continue
            tally = outcomes.setdefault(version, [0, 0, 0])
            if choice == "tie":
                tally[2] += count
            elif (choice == "left") == (left_version == version):
                tally[0] += count
            else:
                tally[1] += count
        out = {}
        for version in sorted(set(generations) | set(by_version), key=_version_sort_key):
            n, n_gen, s_o, ss_o, s_i, ss_i = by_version.get(version, (0, 0, 0, 0, 0, 0))
            tally = outcomes.get(version)
            out[version] = VersionAggregate(
                model_version=version,
                n_generations=generations.get(version, 0),
                n_rated_generations=n_gen,
                n_ratings=n,
                n_reviewers=reviewer_counts.get(version, 0),
                overall=mean_interval(n, s_o or 0, ss_o or 0),
                identity=mean_interval(n, s_i or 0, ss_i or 0),
                flag_counts=flag_counts.get(version, {}),
                win_vs_champion=win_rate_from_counts(version, champion, *tally) if tally else None,
            )
        return out

    def _require_reviewer(self, session: Session, reviewer: str) -> None:
        if session.get(ReviewerRow, reviewer) is None:
            raise ReviewError(f"unknown reviewer {reviewer!r}: sign in (which records the reviewer) first")


def _is_lock_error(exc: OperationalError) -> bool:
    text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
    return "locked" in text or "busy" in text or "deadlock" in text


def pair_key(generation_a: str, generation_b: str) -> str:
    """The key of a blind pair: its two generation ids sorted and joined (independent of display order)."""
    return "|".join(sorted((generation_a, generation_b)))


def _version_sort_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


_GENERATION_COLUMNS = (
    GenerationRow.generation_id,
    GenerationRow.model_version,
    GenerationRow.prompt,
    GenerationRow.seed,
    GenerationRow.reference_paths,
    GenerationRow.boxes,
    GenerationRow.image_path,
    GenerationRow.pre_diir_path,
    GenerationRow.case_id,
)


def _record_from_columns(row) -> GenerationRecord:
    # Rows were validated when registered: construct without validating again (fast for long queues).
    return GenerationRecord.model_construct(
        generation_id=row[0],
        model_version=row[1],
        prompt=row[2],
        seed=row[3],
        reference_paths=list(row[4]),
        boxes=[tuple(b) for b in row[5]],
        image_path=row[6],
        pre_diir_path=row[7],
        case_id=row[8],
    )


def _record(row: GenerationRow) -> GenerationRecord:
    return GenerationRecord(
        generation_id=row.generation_id,
        model_version=row.model_version,
        prompt=row.prompt,
        seed=row.seed,
        reference_paths=list(row.reference_paths),
        boxes=[tuple(b) for b in row.boxes],
        image_path=row.image_path,
        pre_diir_path=row.pre_diir_path,
        case_id=row.case_id,
    )


def _rating(row: RatingRow) -> Rating:
    return Rating(
        reviewer=row.reviewer,
        generation_id=row.generation_id,
        model_version=row.model_version,
        identity_score=row.identity_score,
        overall_score=row.overall_score,
        flags=tuple(sorted(f.flag for f in row.flags)),
        comment=row.comment,
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )


def _judgement(row: JudgementRow) -> Judgement:
    return Judgement(
        reviewer=row.reviewer,
        case_id=row.case_id,
        prompt=row.prompt,
        seed=row.seed,
        left_generation_id=row.left_generation_id,
        right_generation_id=row.right_generation_id,
        left_version=row.left_version,
        right_version=row.right_version,
        choice=row.choice,
        updated_at=as_utc(row.updated_at),
    )
