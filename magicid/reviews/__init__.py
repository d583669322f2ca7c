"""Human review of generations: reviewers, ratings, blind pairwise judgements, and their aggregates.

Reviewers rate single generations (identity fidelity and overall quality on a 1-5 scale, artifact flags, a
comment) and judge blind pairs (champion vs challenger for the same prompt, identities and seed). The
aggregates per model version are exported to MLflow as model-version tags, which the promotion gate reads
(DESIGN.md section 5). The Streamlit app (`dashboards/review.py`) is a thin view over this package.

One mechanism a module (each importable on its own; the names below are re-exported here):
- `auth`: scrypt password hashes, the reviewers file, `SignInThrottle`;
- `manifest`: the generation-manifest contract (records, the path rule, `load_review_image`);
- `display`: Markdown-escaping of untrusted text;
- `tables`: the SQL schema; `statistics`: t and Wilson intervals, `ScoreSummary`, `WinRate`;
- `store`: `ReviewStore` (ratings, judgements, blind pairs, aggregates);
- `export`: the `TAG_*` contract with the promotion gate and `export_review_tags`.
The MLflow client, registry roles and version metrics the leaderboard shows live in `magicid.registry`.

Two contracts with the rest of the platform:

1. Generation manifest (written by evaluation, read here). Every file named `manifest.jsonl` under
   `review.generations_dir` (any depth) holds one JSON object per line:

   ```
   {"generation_id": "v3-0007",              # unique and stable across runs (a rating refers to it)
    "model_version": "3",                    # the MLflow registered-model version that made it
    "prompt": "a photo of two friends",
    "seed": 7,
    "reference_paths": ["references/ada.png"],  # one reference face image per identity, in identity order
    "boxes": [[x0, y0, x1, y1]],              # face boxes (pixels of image_path), one per identity
    "image_path": "0007.png",                 # the generation shown to reviewers (after DIIR where it ran)
    "pre_diir_path": "0007_before.png",       # the same generation before DIIR, or null
    "case_id": null}                          # optional; see below
   ```

   The path rule (one rule for every path in the file: `image_path`, `pre_diir_path`, `reference_paths`):
   a path is relative to the folder that holds that `manifest.jsonl`, written with `/`, and stays inside that
   folder. Absolute paths, `..` segments, backslashes and empty paths are refused, and so is a path that
   resolves (through a symlink) outside the folder; every path must name a regular file. So a generations
   folder is self-contained: evaluation copies the reference crops it used next to the generations
   (`references/<face_id>.png`), and the folder can be moved, copied or served with nothing outside it.
   `write_generation_manifest` refuses to write a record that breaks the rule, `read_generation_manifest`
   refuses to read one (an error naming the manifest, the line and the field), and the review app shows
   no image outside `review.generations_dir` (`load_review_image`).

   Other keys are allowed and ignored (evaluation may add metrics). A *case* is one (prompt, seed,
   identities) combination: two model versions' generations with the same case are a blind pair. `case_id`
   defaults to a hash of the prompt, the seed and the sorted reference paths as written, so evaluation
   should write the same reference path strings for every model version (or set `case_id`).

2. MLflow model-version tags (written by `export_review_tags`, read by the promotion gate): the `TAG_*`
   constants of `export`. Values are strings (MLflow tags are strings): counts as integers, means and rates as
   `repr(float)`. Interval tags are set only where the interval exists (2+ ratings; 1+ pairs); the
   win-rate tags are removed when there are no pairs against the named champion.

What the app may trust (README "Security"): nothing it reads from a manifest. It shows text from manifests,
prompts and comments (and errors quoting them) with `st.text` or, inside its own messages, through
`plain_markdown`; it hands Streamlit only image bytes that `load_review_image` checked and decoded; sign-in
goes through `SignInThrottle.sign_in` (attempts limited per reviewer name and per client, with a lock-out).

Storage: a SQLAlchemy database (`review.db_url`; SQLite file by default, any SQL URL). On SQLite the store
uses WAL, a busy timeout and `BEGIN IMMEDIATE` for writes, and every write is retried on a lock error, so
several processes writing at once lose nothing (tested with processes).
"""

from magicid.reviews.auth import (
    MIN_PASSWORD_LENGTH,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    SignInLocked,
    SignInThrottle,
    add_reviewer,
    authenticate,
    check_reviewer_name,
    hash_password,
    load_reviewers,
    parse_password_hash,
    verify_password,
)
from magicid.reviews.display import (
    plain_markdown,
)
from magicid.reviews.export import (
    TAG_CHAMPION_VERSION,
    TAG_EXPORTED_AT,
    TAG_MEAN_IDENTITY,
    TAG_MEAN_IDENTITY_HI,
    TAG_MEAN_IDENTITY_LO,
    TAG_MEAN_OVERALL,
    TAG_MEAN_OVERALL_HI,
    TAG_MEAN_OVERALL_LO,
    TAG_N_PAIRS,
    TAG_N_RATED_GENERATIONS,
    TAG_N_RATINGS,
    TAG_N_REVIEWERS,
    TAG_WIN_RATE,
    TAG_WIN_RATE_HI,
    TAG_WIN_RATE_LO,
    WIN_RATE_TAGS,
    export_review_tags,
    parse_review_tags,
    review_tags,
)
from magicid.reviews.manifest import (
    MANIFEST_NAME,
    GenerationRecord,
    load_review_image,
    manifest_path_problem,
    read_generation_manifest,
    resolve_manifest_path,
    write_generation_manifest,
)
from magicid.reviews.statistics import (
    Z_95,
    ScoreSummary,
    VersionAggregate,
    WinRate,
    mean_interval,
    wilson_interval,
    win_rate_from_counts,
)
from magicid.reviews.store import (
    ARTIFACT_FLAGS,
    CHOICES,
    SCORE_MAX,
    SCORE_MIN,
    BlindPair,
    Choice,
    Judgement,
    Rating,
    ReviewStore,
    pair_key,
)
from magicid.reviews.tables import (
    Base,
    GenerationRow,
    JudgementRow,
    RatingFlagRow,
    RatingRow,
    ReviewerRow,
)

__all__ = [
    "ARTIFACT_FLAGS",
    "Base",
    "BlindPair",
    "CHOICES",
    "Choice",
    "GenerationRecord",
    "GenerationRow",
    "Judgement",
    "JudgementRow",
    "MANIFEST_NAME",
    "MIN_PASSWORD_LENGTH",
    "Rating",
    "RatingFlagRow",
    "RatingRow",
    "ReviewStore",
    "ReviewerRow",
    "SCORE_MAX",
    "SCORE_MIN",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "ScoreSummary",
    "SignInLocked",
    "SignInThrottle",
    "TAG_CHAMPION_VERSION",
    "TAG_EXPORTED_AT",
    "TAG_MEAN_IDENTITY",
    "TAG_MEAN_IDENTITY_HI",
    "TAG_MEAN_IDENTITY_LO",
    "TAG_MEAN_OVERALL",
    "TAG_MEAN_OVERALL_HI",
    "TAG_MEAN_OVERALL_LO",
    "TAG_N_PAIRS",
    "TAG_N_RATED_GENERATIONS",
    "TAG_N_RATINGS",
    "TAG_N_REVIEWERS",
    "TAG_WIN_RATE",
    "TAG_WIN_RATE_HI",
    "TAG_WIN_RATE_LO",
    "VersionAggregate",
    "WIN_RATE_TAGS",
    "WinRate",
    "Z_95",
    "add_reviewer",
    "authenticate",
    "check_reviewer_name",
    "export_review_tags",
    "hash_password",
    "load_review_image",
    "load_reviewers",
    "manifest_path_problem",
    "mean_interval",
    "pair_key",
    "parse_password_hash",
    "parse_review_tags",
    "plain_markdown",
    "read_generation_manifest",
    "resolve_manifest_path",
    "review_tags",
    "verify_password",
    "wilson_interval",
    "win_rate_from_counts",
    "write_generation_manifest",
]
