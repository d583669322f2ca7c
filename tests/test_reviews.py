"""magicid.reviews: passwords, the generation manifest, the store (ratings, re-rating, blind judgements),
aggregates with their intervals, concurrent writers in several processes, and the MLflow tag export."""

from __future__ import annotations

import math
import multiprocessing
import statistics

import pytest
import yaml
from review_fixtures import PASSWORDS, build_generation_set
from scipy import stats

from magicid import registry, reviews
from magicid.errors import ReviewError
from magicid.registry import RegistryError


@pytest.fixture()
def generation_set(tmp_path):
    return build_generation_set(tmp_path)


@pytest.fixture()
def store(review_db_url, generation_set):
    # Every store test runs on SQLite and on PostgreSQL (tests/conftest.py `review_db_url`).
    store = reviews.ReviewStore(review_db_url)
    store.register_generations(reviews.read_generation_manifest(generation_set["generations_dir"]))
    for name in ("alice", "bob"):
        store.ensure_reviewer(name)
    yield store
    store.close()


# -- passwords and the reviewers file --------------------------------------------------------------------


def test_password_hash_verifies_only_the_right_password():
    encoded = reviews.hash_password("correct horse")
    assert encoded.startswith("scrypt$16384$8$1$") and "correct horse" not in encoded
    assert reviews.verify_password("correct horse", encoded)
    assert not reviews.verify_password("correct horsE", encoded)
    assert reviews.hash_password("correct horse") != encoded  # salted
    with pytest.raises(ReviewError, match="at least 8"):
        reviews.hash_password("short")
    with pytest.raises(ReviewError, match="scrypt hash"):
        reviews.verify_password("x", "plain-text-password")


def test_reviewers_file_holds_hashes_and_authenticates(generation_set):
    path = generation_set["reviewers_file"]
    text = path.read_text()
    assert all(password not in text for password in PASSWORDS.values())
    configured = reviews.load_reviewers(path)
    assert set(configured) == {"alice", "bob"}
    assert reviews.authenticate(configured, "alice", PASSWORDS["alice"])
    assert not reviews.authenticate(configured, "alice", PASSWORDS["bob"])
    assert not reviews.authenticate(configured, "mallory", PASSWORDS["alice"])
    reviews.add_reviewer(path, "alice", "a-new-password")  # a new password replaces the old one
    assert reviews.authenticate(reviews.load_reviewers(path), "alice", "a-new-password")
    assert not reviews.authenticate(reviews.load_reviewers(path), "alice", PASSWORDS["alice"])
    with pytest.raises(ReviewError, match="reviewer name"):
        reviews.add_reviewer(path, "Not Valid!", "long-enough")
    with pytest.raises(ReviewError, match="not found"):
        reviews.load_reviewers(path.parent / "absent.yaml")


@pytest.mark.parametrize(
    "entry, match",
    [
        ("plain-text-password", "is not a scrypt hash"),
        ("scrypt$x$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA", "not a number or not base64"),
        ("scrypt$16384$8$1$not*base64$AAAA", "not a number or not base64"),
        ("scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, "cost n=1073741824"),
        ("scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA", "wrong length"),
    ],
)
def test_a_damaged_reviewers_entry_is_named_and_can_be_reset(tmp_path, entry, match):
    """A hand-edited entry is a ReviewError naming the reviewer (never a ValueError from hashlib at sign-in);
    `review-add-reviewer` for that reviewer replaces it, for another reviewer stops."""
    path = tmp_path / "reviewers.yaml"
    path.write_text(yaml.safe_dump({"reviewers": {"bob": entry}}))
    with pytest.raises(ReviewError, match=f"'bob'.*{match}.*review-add-reviewer bob"):
        reviews.load_reviewers(path)
    with pytest.raises(ReviewError, match=match):
        reviews.verify_password("whatever", entry)
    with pytest.raises(ReviewError, match="'bob'"):
        reviews.add_reviewer(path, "alice", "long-enough")
    reviews.add_reviewer(path, "bob", "a-new-password")
    assert reviews.authenticate(reviews.load_reviewers(path), "bob", "a-new-password")


# -- manifest ---------------------------------------------------------------------------------------------


def test_manifest_paths_are_resolved_and_cases_pair_across_versions(generation_set):
    records = reviews.read_generation_manifest(generation_set["generations_dir"])
    assert len(records) == 6
    by_id = {r.generation_id: r for r in records}
    assert by_id["v1-case1"].case_id == by_id["v2-case1"].case_id != by_id["v1-case0"].case_id
    root = generation_set["generations_dir"]
    assert by_id["v2-case1"].image_path == str((root / "v2" / "case1.png").resolve())
    assert by_id["v2-case1"].reference_paths == [
        str((root / "refs" / f"{p}.png").resolve()) for p in ("ada", "ben")
    ]


def test_manifest_errors_name_file_and_line(generation_set, tmp_path):
    root = generation_set["generations_dir"]
    lines = (root / reviews.MANIFEST_NAME).read_text().splitlines()
    (root / reviews.MANIFEST_NAME).write_text("\n".join([*lines, lines[0]]) + "\n")
    with pytest.raises(ReviewError, match=r"manifest.jsonl:7: generation_id 'v1-case0' already used"):
        reviews.read_generation_manifest(root)
    (root / reviews.MANIFEST_NAME).write_text(lines[0].replace('"seed": 0', '"seed": "x"') + "\n")
    with pytest.raises(ReviewError, match=r"manifest.jsonl:1: not a valid generation record"):
        reviews.read_generation_manifest(root)
    (root / reviews.MANIFEST_NAME).write_text(lines[0].replace("case0.png", "absent.png") + "\n")
    with pytest.raises(ReviewError, match="absent.png does not exist"):
        reviews.read_generation_manifest(root)
    with pytest.raises(ReviewError, match="no manifest.jsonl"):
        reviews.read_generation_manifest(tmp_path / "empty")
    with pytest.raises(ReviewError, match="x0 < x1"):
        reviews.write_generation_manifest(tmp_path, [{**yaml.safe_load(lines[0]), "boxes": [[5, 5, 1, 9]]}])


def _one_record(generation_set, **changes) -> dict:
    record = next(r for r in generation_set["records"] if r["generation_id"] == "v1-case1")
    return {**record, **changes}


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("image_path", "/etc/hostname", "is absolute"),
        ("image_path", "v1/../../outside.png", "has a '..' segment"),
        ("pre_diir_path", "v1\\case1.png", "backslash"),
        ("reference_paths", ["refs/ada.png", ""], "is empty"),
        ("reference_paths", ["refs/ada.png", "escape/ada.png"], "resolves outside the manifest's folder"),
        ("image_path", "v1", "is a folder"),
        ("image_path", "fifo.png", "not a regular file"),
    ],
)
def test_manifest_path_rule_is_enforced_on_write_and_on_read(generation_set, tmp_path, field, value, reason):
    """One rule for every path in a manifest: relative to its folder and inside it, a regular file."""
    import json
    import os

    root = generation_set["generations_dir"]
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "ada.png").write_bytes((root / "refs" / "ada.png").read_bytes())
    (root / "escape").symlink_to(tmp_path / "outside")  # a symlinked folder pointing out of the root
    os.mkfifo(root / "fifo.png")  # opening it for reading would block the app forever
    bad = _one_record(generation_set, generation_id="v1-bad", **{field: value})
    with pytest.raises(ReviewError) as written:
        reviews.write_generation_manifest(root, [bad])
    assert reason in str(written.value) and "contract 1" in str(written.value)
    # A hand-edited manifest with the same path is refused on read, naming the line and the field.
    good = _one_record(generation_set)
    (root / reviews.MANIFEST_NAME).write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ReviewError) as read:
        reviews.read_generation_manifest(root)
    message = str(read.value)
    assert f"manifest.jsonl:2: {field}" in message and reason in message and "\n" not in message


def test_a_manifest_below_the_root_resolves_against_its_own_folder(generation_set, tmp_path):
    root = generation_set["generations_dir"]
    (root / reviews.MANIFEST_NAME).unlink()
    (root / "v1" / "refs").mkdir()
    for name in ("ada", "ben"):
        (root / "v1" / "refs" / f"{name}.png").write_bytes((root / "refs" / f"{name}.png").read_bytes())
    record = _one_record(generation_set, image_path="case1.png", pre_diir_path="case1_raw.png")
    reviews.write_generation_manifest(root / "v1", [record])
    (got,) = reviews.read_generation_manifest(root)
    assert got.image_path == str((root / "v1" / "case1.png").resolve())
    assert got.reference_paths == [str((root / "v1" / "refs" / f"{p}.png").resolve()) for p in ("ada", "ben")]
    # The same paths one folder up name nothing: a path is never read against the root or the cwd.
    with pytest.raises(ReviewError, match="case1.png does not exist"):
        reviews.write_generation_manifest(root, [record])
    # A manifest in a symlinked folder below the root (its files are outside the root) is not read.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "linked").symlink_to(outside)
    for name in ("case1.png", "case1_raw.png"):
        (outside / name).write_bytes((root / "v1" / name).read_bytes())
    (outside / "refs").mkdir()
    for name in ("ada", "ben"):
        (outside / "refs" / f"{name}.png").write_bytes((root / "refs" / f"{name}.png").read_bytes())
    reviews.write_generation_manifest(outside, [{**record, "generation_id": "linked-1"}])
    assert [r.generation_id for r in reviews.read_generation_manifest(root)] == ["v1-case1"]  # not entered


# -- images the app may show ------------------------------------------------------------------------------


def test_load_review_image_shows_only_checked_images_inside_the_root(generation_set, tmp_path):
    import os

    from PIL import Image

    root = generation_set["generations_dir"]
    ok = reviews.load_review_image(root / "v1" / "case0.png", root, max_pixels=10**6)
    assert ok.mode == "RGB" and ok.size == (160, 160)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (255, 0, 255)).save(secret)
    (root / "link.png").symlink_to(secret)
    (root / "garbage.png").write_bytes(b"not a png at all")
    data = (root / "v1" / "case0.png").read_bytes()
    (root / "torn.png").write_bytes(data[: len(data) // 2])
    os.mkfifo(root / "fifo.png")
    cases = {
        secret: "is outside the generations folder",  # absolute, outside
        root / "link.png": "is outside the generations folder",  # a symlink pointing out
        root / ".." / "secret.png": "is outside the generations folder",
        root / "absent.png": "absent.png: file not found",
        root / "fifo.png": "fifo.png: is not a regular file",
        root / "garbage.png": "garbage.png: not an image that can be shown",
        root / "torn.png": "torn.png: not an image that can be shown",
    }
    for path, expected in cases.items():
        with pytest.raises(ReviewError) as info:
            reviews.load_review_image(path, root, max_pixels=10**6)
        message = str(info.value)
        assert expected in message, message
        assert str(tmp_path) not in message and "\n" not in message  # one line, no server path
    with pytest.raises(ReviewError, match=r"v1/case0.png: too large to show \(160x160 = 25600 pixels"):
        reviews.load_review_image(root / "v1" / "case0.png", root, max_pixels=160 * 159)


# -- sign-in limits -----------------------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sign_in_throttle_locks_a_name_out_after_its_failures_and_lets_it_back(generation_set):
    reviewers = reviews.load_reviewers(generation_set["reviewers_file"])
    clock = _Clock()
    throttle = reviews.SignInThrottle(3, 100, 600, clock=clock)
    for attempt in range(3):
        assert not throttle.sign_in(reviewers, "alice", f"guess-{attempt}", client=f"10.0.0.{attempt}")
        clock.now += 10
    # Locked: even the right password, from a new client, is refused without being checked.
    with pytest.raises(reviews.SignInLocked, match="try again in 10 minutes") as info:
        throttle.sign_in(reviewers, "alice", PASSWORDS["alice"], client="10.0.0.99")
    assert info.value.seconds_left == pytest.approx(600 - 30)
    assert throttle.sign_in(reviewers, "bob", PASSWORDS["bob"], client="10.0.0.99")  # other names are not
    clock.now += 600 - 30  # the oldest failure is now lockout_s old
    assert throttle.seconds_locked("alice", "10.0.0.99") == 0
    assert throttle.sign_in(reviewers, "alice", PASSWORDS["alice"], client="10.0.0.99")


def test_sign_in_throttle_limits_a_client_across_names_and_success_does_not_reset_it(generation_set):
    reviewers = reviews.load_reviewers(generation_set["reviewers_file"])
    clock = _Clock()
    throttle = reviews.SignInThrottle(100, 3, 600, clock=clock)
    assert not throttle.sign_in(reviewers, "mallory", "guess-one", client="10.0.0.7")
    assert not throttle.sign_in(reviewers, "alice", "guess-two", client="10.0.0.7")
    # Its own valid account does not reset the client's budget for guessing the others'.
    assert throttle.sign_in(reviewers, "bob", PASSWORDS["bob"], client="10.0.0.7")
    assert not throttle.sign_in(reviewers, "carol", "guess-three", client="10.0.0.7")
    with pytest.raises(reviews.SignInLocked):
        throttle.sign_in(reviewers, "bob", PASSWORDS["bob"], client="10.0.0.7")
    assert throttle.sign_in(
        reviewers, "alice", PASSWORDS["alice"], client="10.0.0.8"
    )  # other clients are not


def test_sign_in_throttle_holds_under_parallel_attempts(generation_set):
    """Each attempt is counted before its password is checked, so parallel guesses cannot overrun the limit."""
    from concurrent.futures import ThreadPoolExecutor

    reviewers = reviews.load_reviewers(generation_set["reviewers_file"])
    throttle = reviews.SignInThrottle(4, 100, 600)

    def attempt(k):
        try:
            return throttle.sign_in(reviewers, "alice", f"guess-{k}", client=f"10.1.0.{k}")
        except reviews.SignInLocked:
            return "locked"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(16)))
    assert outcomes.count(False) == 4 and outcomes.count("locked") == 12


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("plain-text-password", "not a scrypt hash"),
        ("scrypt$16384$8$1$AAAA", "not a scrypt hash"),
        ("scrypt$lots$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, "not a number or not base64"),
        ("scrypt$16384$8$1$not*base64$" + "A" * 44, "not a number or not base64"),
        ("scrypt$16384$8$1000000$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, "not one this program makes"),
        ("scrypt$1000$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44, "not one this program makes"),
        ("scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$", "wrong length"),
    ],
)
def test_a_bad_scrypt_entry_is_a_one_line_error_naming_the_reviewer(generation_set, entry, reason):
    path = generation_set["reviewers_file"]
    configured = yaml.safe_load(path.read_text())
    configured["reviewers"]["bob"] = entry
    path.write_text(yaml.safe_dump(configured))
    with pytest.raises(ReviewError) as info:
        reviews.load_reviewers(path)
    message = str(info.value)
    assert reason in message and "'bob'" in message and "review-add-reviewer bob" in message
    assert "\n" not in message
    with pytest.raises(ReviewError, match=reason):
        reviews.verify_password("whatever-password", entry)
    reviews.add_reviewer(path, "bob", "bobs-new-password")  # the command the error names repairs it
    assert reviews.authenticate(reviews.load_reviewers(path), "bob", "bobs-new-password")


# -- text shown in Markdown elements ----------------------------------------------------------------------

HOSTILE_TEXTS = [
    "![x](http://127.0.0.1:9/pixel.png)",
    "[click](http://example.invalid) <img src=http://example.invalid/i.png> <b>bold</b>",
    "**bold** _it_ `code` ~~gone~~ $x^2$ :red[red] :material/home: www.example.invalid a@b.example",
    "# heading",
    "- item",
    "   - indented item",
    "1. first",
    "> quote",
    "line one\n\n    indented code\n---",
    "back\\slash &amp; &#x3C;script&#x3E; | a | b |",
]


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_plain_markdown_renders_as_the_characters_it_is(text):
    """Rendered by a CommonMark + GFM renderer, the escaped text is one paragraph holding exactly the text
    (line breaks as spaces, leading blanks dropped): no link, image, HTML, emphasis, code, list or heading."""
    import html

    from markdown_it import MarkdownIt

    # CommonMark with GFM's tables and strikethrough (linkify-it, for GFM's bare-URL links, is not installed).
    renderer = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    rendered = renderer.render(reviews.plain_markdown(text)).strip()
    assert rendered.startswith("<p>") and rendered.endswith("</p>") and rendered.count("<") == 2, rendered
    assert html.unescape(rendered[3:-4]) == " ".join(text.splitlines()).lstrip()


def test_a_generation_cannot_change_version(store, generation_set):
    record = reviews.read_generation_manifest(generation_set["generations_dir"])[0]
    with pytest.raises(ReviewError, match="generation ids must be stable"):
        store.register_generations([record.model_copy(update={"model_version": "9"})])


# -- ratings and judgements -------------------------------------------------------------------------------


def test_queue_rating_and_re_rating(store):
    assert [g.generation_id for g in store.queue("alice", "2")] == ["v2-case0", "v2-case1", "v2-case2"]
    store.rate("alice", "v2-case0", identity_score=2, overall_score=3, flags=["blur_or_noise"], comment="a")
    assert [g.generation_id for g in store.queue("alice", "2")] == ["v2-case1", "v2-case2"]
    assert len(store.queue("bob", "2")) == 3  # queues are per reviewer
    first = store.rating("alice", "v2-case0")
    again = store.rate(
        "alice", "v2-case0", identity_score=5, overall_score=4, flags=["other", "visible_seam"]
    )
    assert (again.identity_score, again.overall_score, again.flags) == (5, 4, ("other", "visible_seam"))
    assert again.created_at == first.created_at and again.updated_at >= first.updated_at
    aggregate = store.aggregates()["2"]
    assert (aggregate.n_ratings, aggregate.overall.mean, aggregate.flag_counts) == (
        1,
        4.0,
        {"other": 1, "visible_seam": 1},
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"identity_score": 0, "overall_score": 3}, "identity_score must be an integer 1-5"),
        ({"identity_score": 3, "overall_score": 6}, "overall_score must be an integer 1-5"),
        ({"identity_score": 3, "overall_score": 3, "flags": ["nice"]}, "unknown artifact flags"),
    ],
)
def test_invalid_ratings_are_refused(store, kwargs, match):
    with pytest.raises(ReviewError, match=match):
        store.rate("alice", "v1-case0", **kwargs)
    assert store.rating("alice", "v1-case0") is None


def test_unknown_reviewer_or_generation_cannot_write(store):
    with pytest.raises(ReviewError, match="unknown reviewer 'mallory'"):
        store.rate("mallory", "v1-case0", identity_score=3, overall_score=3)
    with pytest.raises(ReviewError, match="unknown generation 'nope'"):
        store.rate("alice", "nope", identity_score=3, overall_score=3)
    with pytest.raises(ReviewError, match="unknown reviewer"):
        store.judge("mallory", "v1-case0", "v2-case0", "left")


def test_judgements_validate_and_re_judging_replaces(store):
    with pytest.raises(ReviewError, match="both model version"):
        store.judge("alice", "v1-case0", "v1-case1", "left")
    with pytest.raises(ReviewError, match="different cases"):
        store.judge("alice", "v1-case0", "v2-case1", "left")
    with pytest.raises(ReviewError, match="choice must be one of"):
        store.judge("alice", "v1-case0", "v2-case0", "up")
    assert len(store.unjudged_pairs("alice", "1", "2")) == 3
    store.judge("alice", "v1-case0", "v2-case0", "left")
    store.judge("alice", "v2-case0", "v1-case0", "left")  # same pair, other display order: replaces
    assert len(store.history("alice")[1]) == 1
    assert len(store.unjudged_pairs("alice", "1", "2")) == 2
    assert len(store.unjudged_pairs("bob", "2", "1")) == 3
    win = store.win_rate("2", "1")
    assert (win.wins, win.losses, win.ties) == (1, 0, 0)


def test_win_rate_counts_sides_and_ties(store, tmp_path):
    # 2 wins for version 2 (one shown left, one right), 1 loss, 1 tie -> (2 + 0.5) / 4
    for name in ("carol", "dave"):
        store.ensure_reviewer(name)
    store.judge("alice", "v2-case0", "v1-case0", "left")
    store.judge("bob", "v1-case1", "v2-case1", "right")
    store.judge("carol", "v1-case2", "v2-case2", "left")
    store.judge("dave", "v1-case0", "v2-case0", "tie")
    win = store.win_rate("2", "1")
    assert (win.wins, win.losses, win.ties, win.n) == (2, 1, 1, 4)
    assert win.rate == pytest.approx(2.5 / 4)
    assert (win.lo, win.hi) == pytest.approx(reviews.wilson_interval(2.5, 4))
    mirror = store.win_rate("1", "2")
    assert (mirror.wins, mirror.losses, mirror.ties) == (1, 2, 1)
    assert mirror.rate == pytest.approx(1 - win.rate)
    assert store.win_rate("2", "7") is None


def test_wilson_interval_matches_the_closed_form():
    # Reference values: Wilson (1927) score interval, z = 1.96: 8/10 -> [0.4902, 0.9433]; 6/6 -> [0.6097, 1].
    assert reviews.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = reviews.wilson_interval(6, 6)
    assert lo == pytest.approx(0.6097, abs=1e-4) and hi == 1.0
    lo, hi = reviews.wilson_interval(0, 5)
    assert lo == 0.0 and 0 < hi < 0.5
    with pytest.raises(ReviewError):
        reviews.wilson_interval(1, 0)


def test_aggregate_means_and_t_intervals(store):
    scores = {"alice": (5, 4, 2), "bob": (4, 4, 1)}
    for name, overall in scores.items():
        for case, value in enumerate(overall):
            store.rate(name, f"v1-case{case}", identity_score=6 - value, overall_score=value)
    aggregate = store.aggregates()["1"]
    values = [v for overall in scores.values() for v in overall]
    mean, sd = statistics.mean(values), statistics.stdev(values)
    half = stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    assert (aggregate.n_ratings, aggregate.n_reviewers, aggregate.n_rated_generations) == (6, 2, 3)
    assert aggregate.overall.mean == pytest.approx(mean)
    assert (aggregate.overall.lo, aggregate.overall.hi) == pytest.approx((mean - half, mean + half))
    assert aggregate.identity.mean == pytest.approx(6 - mean)
    assert store.aggregates()["2"].n_ratings == 0 and store.aggregates()["2"].overall.mean is None


# -- concurrency ------------------------------------------------------------------------------------------


def _writer(db_url: str, reviewer: str, generation_ids: list[str], rounds: int) -> None:
    store = reviews.ReviewStore(db_url)
    store.ensure_reviewer(reviewer)
    for round_ in range(rounds):
        for index, generation_id in enumerate(generation_ids):
            score = 1 + (round_ + index) % 5
            store.rate(
                reviewer, generation_id, identity_score=score, overall_score=score, comment=f"{round_}"
            )
            # every writer also re-rates one shared row as "shared": one row must remain, not several
            store.rate("shared", "v1-case0", identity_score=score, overall_score=score)
    for case in range(3):
        store.judge(reviewer, f"v1-case{case}", f"v2-case{case}", "left")
    store.close()


@pytest.mark.slow
def test_concurrent_writers_in_processes_lose_nothing(store, tmp_path):
    store.ensure_reviewer("shared")
    generation_ids = [f"v{v}-case{c}" for v in (1, 2) for c in range(3)]
    writers = [f"writer{i}" for i in range(4)]
    rounds = 3
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_writer, args=(store.url, name, generation_ids, rounds)) for name in writers
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * len(writers)
    for name in writers:
        ratings, judgements = store.history(name)
        assert sorted(r.generation_id for r in ratings) == sorted(generation_ids)
        assert all(r.comment == str(rounds - 1) for r in ratings)  # each writer's last re-rating won
        assert len(judgements) == 3
    assert len(store.history("shared")[0]) == 1
    assert store.aggregates()["1"].n_ratings == 3 * len(writers) + 1
    assert store.win_rate("1", "2").wins == 3 * len(writers)


# -- MLflow tags ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_review_tags_to_mlflow_model_versions(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with pytest.raises(RegistryError, match="no MLflow tracking database"):
        registry.tracking_client(uri, create=False)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("magicid")
    for _ in range(2):
        client.create_model_version("magicid", source=str(tmp_path / "model"))
    client.set_registered_model_alias("magicid", "champion", "1")
    client.set_registered_model_alias("magicid", "challenger", "2")
    client = registry.tracking_client(uri, create=False)
    assert registry.registry_roles(client, "magicid") == {"champion": "1", "challenger": "2"}
    assert registry.registry_roles(client, "absent") == {}

    for name in ("alice", "bob"):
        for case in range(3):
            store.rate(name, f"v2-case{case}", identity_score=4, overall_score=3 + (name == "bob"))
            store.judge(name, f"v2-case{case}", f"v1-case{case}", "left" if case else "tie")
    written = reviews.export_review_tags(store, "magicid", client=client)  # champion from the alias
    assert set(written) == {"1", "2"}
    tags = reviews.parse_review_tags(client.get_model_version("magicid", "2").tags)
    assert tags[reviews.TAG_N_RATINGS] == 6 and tags[reviews.TAG_N_REVIEWERS] == 2
    assert tags[reviews.TAG_MEAN_OVERALL] == pytest.approx(3.5)
    assert tags[reviews.TAG_MEAN_OVERALL_LO] < 3.5 < tags[reviews.TAG_MEAN_OVERALL_HI]
    assert tags[reviews.TAG_N_PAIRS] == 6 and tags[reviews.TAG_CHAMPION_VERSION] == "1"
    assert tags[reviews.TAG_WIN_RATE] == pytest.approx(5 / 6)  # 4 wins, 2 ties
    assert (tags[reviews.TAG_WIN_RATE_LO], tags[reviews.TAG_WIN_RATE_HI]) == pytest.approx(
        reviews.wilson_interval(5, 6)
    )
    champion_tags = reviews.parse_review_tags(client.get_model_version("magicid", "1").tags)
    assert champion_tags[reviews.TAG_N_RATINGS] == 0 and reviews.TAG_WIN_RATE not in champion_tags

    # Against a champion it was never compared with, the old win rate must not linger for the gate.
    reviews.export_review_tags(store, "magicid", ["2"], champion="2", client=client)
    tags = client.get_model_version("magicid", "2").tags
    assert not set(reviews.WIN_RATE_TAGS) & set(tags) and tags[reviews.TAG_N_PAIRS] == "0"
    with pytest.raises(ReviewError, match="version '9' is not in the MLflow registry"):
        reviews.export_review_tags(store, "magicid", ["9"], champion="1", client=client)


def test_cli_adds_a_reviewer_with_a_hidden_prompted_password(tmp_path):
    from typer.testing import CliRunner

    from magicid.cli import app

    path = tmp_path / "reviewers.yaml"
    result = CliRunner().invoke(
        app,
        ["review-add-reviewer", "carol", "--reviewers", str(path)],
        input="carol-password\ncarol-password\n",
    )
    assert result.exit_code == 0, result.output
    assert "carol-password" not in path.read_text()
    assert reviews.authenticate(reviews.load_reviewers(path), "carol", "carol-password")
    result = CliRunner().invoke(
        app, ["review-add-reviewer", "Bad Name", "--reviewers", str(path), "--password", "x" * 9]
    )
    assert result.exit_code == 2 and "reviewer name" in result.output
