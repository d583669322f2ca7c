"""The review store's SQL schema (SQLAlchemy declarative tables) and its UTC time rule."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    # SQLite keeps no time zone: times are written in UTC, so a naive one read back is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True)}


class ReviewerRow(Base):
    __tablename__ = "reviewers"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(default=utc_now)


class GenerationRow(Base):
    __tablename__ = "generations"
    generation_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    case_id: Mapped[str] = mapped_column(String(64), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(Integer)
    image_path: Mapped[str] = mapped_column(Text)
    pre_diir_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    reference_paths: Mapped[list] = mapped_column(JSON)
    boxes: Mapped[list] = mapped_column(JSON)


class RatingRow(Base):
    __tablename__ = "ratings"
    __table_args__ = (
        UniqueConstraint("reviewer", "generation_id", name="one_rating_per_reviewer_and_generation"),
        # Covering indexes: the per-version aggregates read only these columns, in this order.
        Index("ratings_by_version", "model_version", "generation_id", "overall_score", "identity_score"),
        Index("ratings_by_version_reviewer", "model_version", "reviewer"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    reviewer: Mapped[str] = mapped_column(ForeignKey("reviewers.name"))
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.generation_id"))
    # Copied from the generation so the per-version aggregates need no join.
    model_version: Mapped[str] = mapped_column(String(64))
    identity_score: Mapped[int] = mapped_column(Integer)
    overall_score: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)
    flags: Mapped[list[RatingFlagRow]] = relationship(cascade="all, delete-orphan", lazy="selectin")


class RatingFlagRow(Base):
    __tablename__ = "rating_flags"
    __table_args__ = (Index("flags_by_version", "model_version", "flag"),)
    rating_id: Mapped[int] = mapped_column(ForeignKey("ratings.id", ondelete="CASCADE"), primary_key=True)
    flag: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Copied from the rating so flag counts per version need no join.
    model_version: Mapped[str] = mapped_column(String(64))


class JudgementRow(Base):
    __tablename__ = "judgements"
    __table_args__ = (
        UniqueConstraint("reviewer", "pair_key", name="one_judgement_per_reviewer_and_pair"),
        Index("judgements_by_versions", "left_version", "right_version"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    reviewer: Mapped[str] = mapped_column(ForeignKey("reviewers.name"))
    # The two generation ids sorted and joined: the pair regardless of which side it was shown on.
    pair_key: Mapped[str] = mapped_column(String(401))
    case_id: Mapped[str] = mapped_column(String(64))
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(Integer)
    left_generation_id: Mapped[str] = mapped_column(ForeignKey("generations.generation_id"))
    right_generation_id: Mapped[str] = mapped_column(ForeignKey("generations.generation_id"))
    left_version: Mapped[str] = mapped_column(String(64))
    right_version: Mapped[str] = mapped_column(String(64))
    choice: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)
