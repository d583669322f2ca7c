"""Streamlit app: reviewers rate generations and judge blind champion-vs-challenger pairs.

Thin: every read and write goes through `magicid.reviews` (store, manifest, aggregates, MLflow tags).
Pages: Review (a queue of unrated generations of one model version, with the reference faces, the
generation and its pre-DIIR image with face boxes, and the rating form), Compare (blind pairs: the same
prompt, identities and seed from two versions, in random order, versions shown only after the choice is
saved), Leaderboard (metrics, rating aggregates, win rates; champion and challenger marked), My history.
Nothing is shown or written before sign-in; writes always use the signed-in reviewer.

Safety (README "Security"): sign-in goes through `reviews.SignInThrottle` (attempts limited per reviewer name
and per client address, with a lock-out); text from manifests, prompts and comments is shown with `st.text`,
or escaped with `reviews.plain_markdown` inside the app's own messages (every `st.caption`, `st.success`,
`st.error`... renders Markdown); images reach Streamlit only as bytes `reviews.load_review_image` checked
(inside `review.generations_dir`, a regular file, within `data.max_pixels`, decodable), so no `/media` URL
serves a file the app refuses, and a bad one is a one-line inline error naming the file.

Run: `.venv/bin/streamlit run dashboards/review.py -- --params params.yaml`
Keyboard: Tab moves between fields, arrow keys change a score, Ctrl+Enter saves a rating; on Compare,
1 = left is better, 2 = tie, 3 = right is better.
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path
from typing import NamedTuple

import streamlit as st

from magicid import reviews
from magicid.config import ReviewParams, load_params
from magicid.errors import MagicIDError
from magicid.imaging.boxes import draw_boxes

PAGES = ("Review", "Compare", "Leaderboard", "My history")
BOX_COLOUR = (0, 255, 0)  # pure green: the browser test looks for it on the face-box outline
_shuffle = random.SystemRandom()
_md = reviews.plain_markdown  # untrusted text inside a Markdown-rendering element


class ImageSource(NamedTuple):
    """Where images may come from (`review.generations_dir`) and how large they may be (`data.max_pixels`)."""

    root: str
    max_pixels: int


def _params():
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args, _ = parser.parse_known_args()
    path = Path(args.params)
    return load_params(path if path.is_file() or args.params != "params.yaml" else None, args.overrides)


@st.cache_resource
def _store(db_url: str) -> reviews.ReviewStore:
    return reviews.ReviewStore(db_url)


@st.cache_data(show_spinner=False)
def _sync(db_url: str, generations_dir: str, manifests: tuple[tuple[str, float], ...]) -> int:
    """Register the manifests' generations; re-runs only when a manifest file changes (mtimes in the key)."""
    return _store(db_url).register_generations(reviews.read_generation_manifest(generations_dir))


@st.cache_data(show_spinner=False, max_entries=1024)
def _png(
    path: str,
    boxes: tuple[tuple[float, ...], ...],
    stamp: tuple[int, int],
    max_side: int,
    source: ImageSource,
) -> bytes:
    """The checked image at `path` with its face boxes drawn, scaled to at most `max_side`, as PNG bytes.

    `stamp` (mtime, size) is only the cache key, so a rewritten file is read again; a refused image raises
    `ReviewError`, which is never cached.
    """
    image = reviews.load_review_image(path, source.root, source.max_pixels)
    image = draw_boxes(image, boxes, colour=BOX_COLOUR) if boxes else image
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _stamp(path: str) -> tuple[int, int]:
    try:
        info = Path(path).stat()
    except OSError:
        return (0, 0)  # load_review_image says what is wrong with it
    return (info.st_mtime_ns, info.st_size)


def _image(source: ImageSource, path: str, boxes=(), max_side: int = 768) -> bytes:
    """PNG bytes of a checked image; `ReviewError` (one line naming the file) when it may not be shown."""
    return _png(path, tuple(tuple(b) for b in boxes), _stamp(path), max_side, source)


def _show_image(container, source: ImageSource, path: str, caption: str, boxes=()) -> None:
    """The image in `container` (PNG: JPEG artefacts on faces would bias ratings), or an inline error."""
    try:
        data = _image(source, path, boxes)
    except MagicIDError as error:
        container.error(_md(f"{caption}: {error}"))
        return
    container.image(data, caption=caption, width="stretch", output_format="PNG")


@st.cache_data(show_spinner=False, ttl=30)
def _registry(tracking_uri: str, model_name: str) -> tuple[dict[str, str], dict[str, dict[str, float]], str]:
    """(alias -> version, version -> metrics, a note when the registry cannot be read)."""
    try:
        from magicid import registry

        client = registry.tracking_client(tracking_uri, create=False)
        roles = registry.registry_roles(client, model_name)
        if not roles:
            return {}, {}, f"no registered model {model_name!r} with aliases at {tracking_uri}"
        versions = {v.version for v in client.search_model_versions(f"name='{model_name}'")}
        metrics = {str(v): registry.version_metrics(client, model_name, str(v)) for v in versions}
        return roles, metrics, ""
    except MagicIDError as error:
        return {}, {}, str(error)


@st.cache_resource
def _throttle(
    reviewers_file: str, per_name: int, per_client: int, lockout_s: float
) -> reviews.SignInThrottle:
    """One throttle per reviewers file and limits, shared by every session of this app process."""
    return reviews.SignInThrottle(per_name, per_client, lockout_s)


def _client() -> str:
    # The TCP peer of the session's WebSocket (not a forwarded header); Streamlit reports loopback as None, and
    # without a session client (AppTest) it is not a string: both count as the one client "localhost".
    address = st.context.ip_address
    return address if isinstance(address, str) and address else "localhost"


def _sign_in(review: ReviewParams, store: reviews.ReviewStore) -> str:
    """The signed-in reviewer's name; otherwise shows only the sign-in form and stops the script."""
    if st.session_state.get("reviewer"):
        return st.session_state["reviewer"]
    st.title("MagicID review: sign in")
    with st.form("sign_in"):
        name = st.text_input("Reviewer")
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        throttle = _throttle(
            review.reviewers_file,
            review.sign_in_max_failures_per_name,
            review.sign_in_max_failures_per_client,
            review.sign_in_lockout_s,
        )
        try:
            reviewers = reviews.load_reviewers(review.reviewers_file)
            ok = throttle.sign_in(reviewers, name.strip(), password, client=_client())
        except MagicIDError as error:
            st.error(_md(str(error)))
            st.stop()
        if ok:
            store.ensure_reviewer(name.strip())
            st.session_state["reviewer"] = name.strip()
            st.rerun()
        st.error("Wrong reviewer name or password.")
    st.stop()


def _references(source: ImageSource, record: reviews.GenerationRecord) -> None:
    if not record.reference_paths:
        st.caption("no reference faces (text only)")
        return
    shown, captions = [], []
    for i, path in enumerate(record.reference_paths):
        try:
            shown.append(_image(source, path, max_side=256))
            captions.append(f"identity {i + 1}")
        except MagicIDError as error:
            st.error(_md(f"identity {i + 1}: {error}"))
    if shown:
        st.image(shown, caption=captions, width=96, output_format="PNG")


def _flash() -> None:
    message = st.session_state.pop("flash", None)
    if message:
        st.success(_md(message))


def review_page(store: reviews.ReviewStore, reviewer: str, versions: list[str], source: ImageSource) -> None:
    st.header("Review")
    version = st.sidebar.selectbox("Model version to review", versions, index=len(versions) - 1)
    include_rated = st.checkbox("Also list generations I have rated (to re-rate them)", key="include_rated")
    unrated = store.queue(reviewer, version)
    listed = store.queue(reviewer, version, include_rated=True) if include_rated else unrated
    n_total = len(listed) if include_rated else len(store.queue(reviewer, version, include_rated=True))
    st.caption(_md(f"{len(unrated)} unrated of {n_total} generations of model version {version}"))
    _flash()
    if not listed:
        st.success("Nothing left to rate for this version.")
        return
    unrated_ids = {g.generation_id for g in unrated}
    by_id = {g.generation_id: g for g in listed}
    generation_id = st.selectbox(
        "Generation",
        list(by_id),
        format_func=lambda g: g if g in unrated_ids else f"{g} (rated)",
        key=f"generation-{version}-{include_rated}-{len(unrated)}",
    )
    record = by_id[generation_id]
    st.text(f"Prompt: {record.prompt}")
    st.caption(_md(f"seed {record.seed}, {len(record.reference_paths)} identities, model version {version}"))
    _references(source, record)
    after, before = st.columns(2)
    _show_image(
        after, source, record.image_path, "generation (after DIIR), face boxes in green", record.boxes
    )
    if record.pre_diir_path:
        _show_image(before, source, record.pre_diir_path, "before DIIR", record.boxes)
    else:
        before.caption("no pre-DIIR image (DIIR did not run for this generation)")

    existing = store.rating(reviewer, generation_id)
    if existing is not None:
        st.caption(f"You rated this on {existing.updated_at:%Y-%m-%d %H:%M} UTC; saving again replaces it.")
        if existing.comment:
            st.text(f"Your comment: {existing.comment}")
    scores = list(range(reviews.SCORE_MIN, reviews.SCORE_MAX + 1))
    with st.form(f"rate-{generation_id}"):
        st.radio(
            "Identity fidelity (1 = other people, 5 = clearly the references)",
            scores,
            index=(existing.identity_score if existing else 3) - 1,
            horizontal=True,
            key=f"identity-{generation_id}",
        )
        st.radio(
            "Overall quality (1 = unusable, 5 = excellent)",
            scores,
            index=(existing.overall_score if existing else 3) - 1,
            horizontal=True,
            key=f"overall-{generation_id}",
        )
        st.multiselect(
            "Artifacts",
            reviews.ARTIFACT_FLAGS,
            default=existing.flags if existing else [],
            key=f"flags-{generation_id}",
        )
        st.text_area(
            "Comment (plain text)", value=existing.comment if existing else "", key=f"comment-{generation_id}"
        )
        # A callback saves before the script reruns, so the queue below is already the new one.
        st.form_submit_button(
            "Save rating",
            shortcut="Ctrl+Enter",
            type="primary",
            on_click=_save_rating,
            args=(store, reviewer, generation_id),
        )


def _save_rating(store: reviews.ReviewStore, reviewer: str, generation_id: str) -> None:
    state = st.session_state
    store.rate(
        reviewer,
        generation_id,
        identity_score=state[f"identity-{generation_id}"],
        overall_score=state[f"overall-{generation_id}"],
        flags=state[f"flags-{generation_id}"],
        comment=state[f"comment-{generation_id}"],
    )
    state["flash"] = f"Saved your rating of {generation_id}."


def compare_page(
    store: reviews.ReviewStore, reviewer: str, champion: str, challenger: str, source: ImageSource
) -> None:
    st.header("Blind compare")
    revealed = st.session_state.pop("revealed", None)
    if revealed:
        st.success(
            _md(
                f"Saved your choice for the previous pair ({revealed['prompt']!r}): {revealed['choice']}. "
                f"Left was model version {revealed['left']}, right was model version {revealed['right']}."
            )
        )
    pending = store.unjudged_pairs(reviewer, champion, challenger)
    st.caption(f"{len(pending)} pairs left to judge for these two versions")
    if not pending:
        st.info("No pairs left: every case both versions generated is judged.")
        st.session_state.pop("blind", None)
        return
    by_key = {reviews.pair_key(p.first.generation_id, p.second.generation_id): p for p in pending}
    blind = st.session_state.get("blind")
    if blind is None or blind["key"] not in by_key:
        key = next(iter(by_key))
        pair = by_key[key]
        # The display order is drawn once per pair and kept across reruns, so it cannot flip mid-decision.
        left, right = (pair.first, pair.second) if _shuffle.random() < 0.5 else (pair.second, pair.first)
        blind = {"key": key, "left": left.generation_id, "right": right.generation_id}
        st.session_state["blind"] = blind
    pair = by_key[blind["key"]]
    left, right = (
        (pair.first, pair.second) if pair.first.generation_id == blind["left"] else (pair.second, pair.first)
    )
    st.text(f"Prompt: {left.prompt}")
    st.caption(f"seed {left.seed}, {len(left.reference_paths)} identities")
    _references(source, left)
    left_column, right_column = st.columns(2)
    _show_image(left_column, source, left.image_path, "Left", left.boxes)
    _show_image(right_column, source, right.image_path, "Right", right.boxes)
    choices = st.columns(3)
    for column, (label, shortcut, choice) in zip(
        choices,
        (("Left is better", "1", "left"), ("Tie", "2", "tie"), ("Right is better", "3", "right")),
        strict=True,
    ):
        column.button(
            label,
            shortcut=shortcut,
            width="stretch",
            on_click=_save_judgement,
            args=(store, reviewer, left.generation_id, right.generation_id, choice),
        )


def _save_judgement(store: reviews.ReviewStore, reviewer: str, left: str, right: str, choice: str) -> None:
    saved = store.judge(reviewer, left, right, choice)
    st.session_state["revealed"] = {
        "choice": choice,
        "left": saved.left_version,
        "right": saved.right_version,
        "prompt": saved.prompt,
    }
    st.session_state.pop("blind", None)


def _interval(summary) -> str:
    if summary.mean is None:
        return ""
    if summary.lo is None:
        return f"{summary.mean:.2f}"
    return f"{summary.mean:.2f} [{summary.lo:.2f}, {summary.hi:.2f}]"


def leaderboard_page(
    store, params, champion: str | None, challenger: str | None, metrics: dict, roles_source: str
) -> None:
    st.header("Leaderboard")
    st.caption(_md(f"champion and challenger: {roles_source}"))
    rows = []
    for version, agg in store.aggregates(champion=champion).items():
        win = agg.win_vs_champion
        row = {
            "version": version,
            "role": "champion" if version == champion else "challenger" if version == challenger else "",
            "generations": agg.n_generations,
            "rated": agg.n_rated_generations,
            "ratings": agg.n_ratings,
            "reviewers": agg.n_reviewers,
            "overall (95% CI)": _interval(agg.overall),
            "identity (95% CI)": _interval(agg.identity),
            "win rate vs champion (95% Wilson)": (
                f"{win.rate:.2f} [{win.lo:.2f}, {win.hi:.2f}]" if win is not None else ""
            ),
            "pairs": win.n if win is not None else 0,
            "flags": ", ".join(f"{k} {v}" for k, v in sorted(agg.flag_counts.items())),
        }
        row.update({f"metric: {k}": v for k, v in sorted(metrics.get(version, {}).items())})
        rows.append(row)
    st.dataframe(rows, hide_index=True, width="stretch")
    st.caption("Ties count half a win. Means are over ratings (1-5) with 95% t intervals.")
    if st.button("Export review aggregates to MLflow (model-version tags)"):
        try:
            from magicid.registry import open_client

            client = open_client(params, create=False)
            written = reviews.export_review_tags(
                store,
                params.promotion.model_name,
                [r["version"] for r in rows],
                champion=champion,
                client=client,
            )
            st.success(_md(f"Tagged versions {', '.join(written)} of {params.promotion.model_name!r}."))
        except MagicIDError as error:
            st.error(_md(str(error)))


def history_page(store: reviews.ReviewStore, reviewer: str) -> None:
    st.header(_md(f"My history ({reviewer})"))
    ratings, judgements = store.history(reviewer)
    st.subheader(f"Ratings ({len(ratings)})")
    st.dataframe(
        [
            {
                "generation": r.generation_id,
                "version": r.model_version,
                "identity": r.identity_score,
                "overall": r.overall_score,
                "flags": ", ".join(r.flags),
                "updated (UTC)": f"{r.updated_at:%Y-%m-%d %H:%M}",
            }
            for r in ratings
        ],
        hide_index=True,
        width="stretch",
    )
    commented = [r for r in ratings if r.comment][:50]
    if commented:
        st.subheader("My comments")
        for r in commented:
            # st.text, never markdown: a comment's links or images must not render.
            st.text(f"{r.generation_id}: {r.comment}")
    st.subheader(f"Blind judgements ({len(judgements)})")
    st.dataframe(
        [
            {
                "prompt": j.prompt,
                "seed": j.seed,
                "left version": j.left_version,
                "right version": j.right_version,
                "choice": j.choice,
                "updated (UTC)": f"{j.updated_at:%Y-%m-%d %H:%M}",
            }
            for j in judgements
        ],
        hide_index=True,
        width="stretch",
    )


def _one_version_note(version: str, generations_dir: Path) -> str:
    """Markdown: why Compare is empty after a first evaluation, and how to get a second version."""
    return (
        f"Only model version {_md(version)} has generations under {_md(str(generations_dir))}, and a blind "
        "pair compares two versions on the same evaluation set. To get a second version: train and register "
        "another one with `magicid train` (it becomes the challenger), then run `magicid evaluate`, which "
        "writes its generations next to these (a second `magicid demo` reuses its cached training and adds "
        "no version). Reload this page afterwards; "
        f"meanwhile, rate version {_md(version)} on the Review page."
    )


def main() -> None:
    st.set_page_config(page_title="MagicID review", layout="wide")
    try:
        params = _params()
        store = _store(params.review.db_url)
    except MagicIDError as error:
        st.error(_md(str(error)))
        return
    reviewer = _sign_in(params.review, store)

    st.sidebar.markdown(f"Signed in as **{_md(reviewer)}**")
    if st.sidebar.button("Sign out"):
        st.session_state.clear()
        st.rerun()
    generations_dir = Path(params.review.generations_dir)
    manifests = (
        tuple((str(p), p.stat().st_mtime) for p in sorted(generations_dir.rglob(reviews.MANIFEST_NAME)))
        if generations_dir.is_dir()
        else ()
    )
    try:
        _sync(params.review.db_url, str(generations_dir), manifests)
    except MagicIDError as error:
        st.error(_md(str(error)))
        return
    versions = store.model_versions()
    page = st.sidebar.radio("Page", PAGES, key="page")
    if not versions:
        st.info(_md(f"No generations to review: no {reviews.MANIFEST_NAME} under {generations_dir}."))
        return
    source = ImageSource(str(generations_dir), params.data.max_pixels)

    roles, metrics, note = _registry(params.tracking.uri, params.promotion.model_name)
    champion = challenger = None
    if len(versions) >= 2 and page in ("Compare", "Leaderboard"):
        default_champion = roles.get("champion", versions[-2])
        default_challenger = roles.get("challenger", versions[-1])
        champion = st.sidebar.selectbox(
            "Champion",
            versions,
            index=versions.index(default_champion) if default_champion in versions else 0,
        )
        others = [v for v in versions if v != champion]
        challenger = st.sidebar.selectbox(
            "Challenger",
            others,
            index=others.index(default_challenger) if default_challenger in others else len(others) - 1,
        )
    roles_source = (
        "MLflow aliases (change them in the sidebar)" if roles else f"chosen in the sidebar ({note})"
    )

    if page == "Review":
        review_page(store, reviewer, versions, source)
    elif page == "Compare":
        if champion is None:
            st.info(_one_version_note(versions[0], generations_dir))
            return
        compare_page(store, reviewer, champion, challenger, source)
    elif page == "Leaderboard":
        leaderboard_page(store, params, champion, challenger, metrics, roles_source)
    else:
        history_page(store, reviewer)


main()
