"""The review dashboard under AppTest: sign-in gate, rating, re-rating, a blind pairwise choice, the
leaderboard and the reviewer's own history, against a store and a PIL-drawn generation set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from review_fixtures import PASSWORDS, build_generation_set

from magicid.reviews import ReviewStore

APP = Path(__file__).resolve().parents[2] / "dashboards" / "review.py"


@pytest.fixture()
def review_env_db_url(request, tmp_path):
    """The review store's database: SQLite, or a fresh PostgreSQL database where a test asks for
    `postgresql` (indirect parametrisation)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return f"sqlite:///{tmp_path / 'reviews.db'}"
    return request.getfixturevalue("postgres_cluster").create_database("review_app")


@pytest.fixture()
def review_env(tmp_path, monkeypatch, review_env_db_url):
    fixture = build_generation_set(tmp_path)
    db_url = review_env_db_url
    params = {
        "review": {
            "db_url": db_url,
            "generations_dir": str(fixture["generations_dir"]),
            "reviewers_file": str(fixture["reviewers_file"]),
        },
        # No registry here: champion and challenger are chosen in the sidebar (defaults: the last two).
        "tracking": {"uri": f"sqlite:///{tmp_path / 'no-mlflow.db'}"},
    }
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    monkeypatch.setattr(sys, "argv", ["review.py", "--params", str(params_file)])
    return {**fixture, "db_url": db_url}


def _app():
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(APP), default_timeout=60)
    app.run()
    return app


def _sign_in(app, name, password):
    app.text_input[0].input(name)
    app.text_input[1].input(password)
    app.button[0].click().run()
    return app


def _signed_in(name="alice"):
    app = _sign_in(_app(), name, PASSWORDS[name])
    assert not app.exception, app.exception
    return app


def _page(app, page):
    app.sidebar.radio[0].set_value(page).run()
    assert not app.exception, app.exception
    return app


def test_nothing_is_shown_before_sign_in(review_env):
    app = _app()
    assert not app.exception
    assert [t.label for t in app.text_input] == ["Reviewer", "Password"]
    assert len(app.sidebar.radio) == 0 and len(app.main.radio) == 0
    assert not app.image and not app.dataframe


def test_wrong_password_is_refused_and_writes_nothing(review_env):
    app = _sign_in(_app(), "alice", "not-alices-password")
    assert not app.exception
    assert app.error and "Wrong reviewer name or password" in app.error[0].value
    assert "reviewer" not in app.session_state
    assert len(app.sidebar.radio) == 0
    # An unknown reviewer gets the same answer.
    app = _sign_in(_app(), "mallory", "whatever-password")
    assert app.error and "Wrong reviewer name or password" in app.error[0].value
    assert ReviewStore(review_env["db_url"]).reviewers() == []


def test_right_password_signs_in_and_shows_the_queue(review_env):
    app = _signed_in("alice")
    assert app.session_state["reviewer"] == "alice"
    assert "alice" in app.sidebar.markdown[0].value
    assert any("3 unrated of 3 generations of model version 2" in c.value for c in app.caption)
    assert app.main.selectbox[0].value == "v2-case0"
    assert len(app.image) >= 3  # references, the generation, before DIIR


def _rate(app, identity, overall, flags=(), comment=""):
    app.main.radio[0].set_value(identity)
    app.main.radio[1].set_value(overall)
    app.main.multiselect[0].set_value(list(flags))
    app.main.text_area[0].input(comment)
    next(b for b in app.button if b.label.startswith("Save rating")).click().run()
    assert not app.exception, app.exception
    return app


def test_rating_is_saved_for_the_signed_in_reviewer_and_leaves_the_queue(review_env):
    app = _signed_in("alice")
    _rate(app, 4, 2, ["visible_seam"], "seam on the left face")
    store = ReviewStore(review_env["db_url"])
    rating = store.rating("alice", "v2-case0")
    assert (rating.identity_score, rating.overall_score, rating.flags) == (4, 2, ("visible_seam",))
    assert rating.comment == "seam on the left face" and rating.model_version == "2"
    assert store.rating("bob", "v2-case0") is None
    assert app.success and "v2-case0" in app.success[0].value
    assert any("2 unrated of 3" in c.value for c in app.caption)
    assert app.main.selectbox[0].value == "v2-case1"  # the next unrated one


def test_re_rating_updates_the_one_rating(review_env):
    app = _signed_in("alice")
    _rate(app, 4, 2, comment="first look")
    app.main.checkbox[0].check().run()
    app.main.selectbox[0].set_value("v2-case0").run()
    assert app.main.radio[0].value == 4 and app.main.radio[1].value == 2  # the form shows the saved rating
    _rate(app, 5, 5, comment="fine after all")
    store = ReviewStore(review_env["db_url"])
    ratings, _ = store.history("alice")
    assert [(r.generation_id, r.identity_score, r.overall_score) for r in ratings] == [("v2-case0", 5, 5)]
    assert store.aggregates()["2"].n_ratings == 1


def test_comments_render_as_plain_text(review_env):
    app = _signed_in("alice")
    comment = "see [here](http://example.invalid) ![x](http://example.invalid/x.png)"
    _rate(app, 3, 3, comment=comment)
    _page(app, "My history")
    assert any(comment in t.value for t in app.text)
    assert not any("example.invalid" in m.value for m in app.markdown)


@pytest.mark.parametrize("review_env_db_url", ["sqlite", "postgresql"], indirect=True)
def test_blind_choice_is_saved_and_versions_revealed_only_after(review_env):
    app = _page(_signed_in("bob"), "Compare")
    blind = app.session_state["blind"]
    shown = " ".join(e.value for e in [*app.main.markdown, *app.main.caption, *app.main.text])
    assert blind["left"] not in shown and blind["right"] not in shown  # ids name the version
    assert "model version" not in shown and not app.main.success
    assert [img.captions for img in app.main.image][-2:] == [["Left"], ["Right"]]
    assert any("3 pairs left" in c.value for c in app.caption)
    next(b for b in app.button if b.label.startswith("Right is better")).click().run()
    assert not app.exception, app.exception
    store = ReviewStore(review_env["db_url"])
    (judgement,) = store.history("bob")[1]
    assert (judgement.left_generation_id, judgement.right_generation_id) == (blind["left"], blind["right"])
    assert judgement.choice == "right" and {judgement.left_version, judgement.right_version} == {"1", "2"}
    assert app.success and (
        f"Left was model version {judgement.left_version}, right was model version {judgement.right_version}"
        in app.success[0].value
    )
    assert any("2 pairs left" in c.value for c in app.caption)
    win = store.win_rate(judgement.right_version, judgement.left_version)
    assert (win.wins, win.losses, win.ties) == (1, 0, 0)


def test_leaderboard_marks_roles_and_shows_aggregates(review_env):
    store = ReviewStore(review_env["db_url"])
    store.register_generations(
        __import__("magicid.reviews", fromlist=["x"]).read_generation_manifest(review_env["generations_dir"])
    )
    for name in ("alice", "bob"):
        store.ensure_reviewer(name)
        for case in range(3):
            store.rate(name, f"v1-case{case}", identity_score=3, overall_score=2)
            store.rate(name, f"v2-case{case}", identity_score=5, overall_score=4)
            # version 2 (challenger) shown left and chosen every time
            store.judge(name, f"v2-case{case}", f"v1-case{case}", "left")
    app = _page(_signed_in("alice"), "Leaderboard")
    table = app.dataframe[0].value.set_index("version")
    assert table.loc["1", "role"] == "champion" and table.loc["2", "role"] == "challenger"
    assert table.loc["2", "ratings"] == 6 and table.loc["2", "reviewers"] == 2
    assert table.loc["2", "overall (95% CI)"].startswith("4.00")
    assert table.loc["2", "pairs"] == 6
    assert table.loc["2", "win rate vs champion (95% Wilson)"].startswith("1.00 [0.61")
    assert table.loc["1", "win rate vs champion (95% Wilson)"] == ""
    assert any("chosen in the sidebar" in c.value for c in app.caption)


# -- on the output of `evaluate` (issue 27): the path rule, end to end ----------------------------------------


def _write_params(tmp_path: Path, monkeypatch, review: dict, **sections) -> Path:
    params_file = tmp_path / "params.yaml"
    params = {"review": review, "tracking": {"uri": f"sqlite:///{tmp_path / 'no-mlflow.db'}"}, **sections}
    params_file.write_text(yaml.safe_dump(params))
    monkeypatch.setattr(sys, "argv", ["review.py", "--params", str(params_file)])
    return params_file


def _evaluate_generations(project: Path, monkeypatch) -> Path:
    """What `evaluate` writes for a tiny run, laid out as after `make demo`: run from the project root, the
    dataset at `data/idzoom` and the generations at `reports/eval/generations`, both relative. The images
    are random pixels (no model); the folder, the reference copies and both manifests are written by
    evaluate's own writer (`report.write_generations`, which `evaluate_model` calls)."""
    import numpy as np

    from magicid.config import load_params
    from magicid.evaluation.evalset import build_eval_set
    from magicid.evaluation.report import write_generations
    from magicid.evaluation.run import Generation
    from magicid.training.synthetic import write_synthetic_idzoom

    project.mkdir()
    monkeypatch.chdir(project)
    write_synthetic_idzoom(Path("data/idzoom"), n_images=4, crop_size=64, seed=0)
    params = load_params(None, ["model.resolution=64", "eval.n_people=[1,2]", "eval.seeds=[11]",
                                "eval.reference_split=train", "eval.n_prompts=2"])  # fmt: skip
    eval_set = build_eval_set(params.data.out_dir, params)
    assert (
        params.data.out_dir == "data/idzoom"
        and not Path(eval_set.references[next(iter(eval_set.references))].crop_path).is_absolute()
    )
    rng = np.random.default_rng(0)
    generations = [
        Generation(item, rng.integers(0, 255, (64, 64, 3), np.uint8), rng.integers(0, 255, (64, 64, 3), np.uint8),
                   np.zeros((64, 64), np.uint8), 1)
        for item in eval_set.items
    ]  # fmt: skip
    return write_generations(Path(params.review.generations_dir), "magicid", "1", generations, eval_set)


@pytest.mark.slow
def test_the_review_page_shows_evaluates_output_with_its_references(tmp_path, monkeypatch):
    """The demo's case: `evaluate` wrote the manifest with the dataset elsewhere. Every path in it is relative
    to the manifest's folder and inside it (the reference crops are copied there), so the references load
    even with the dataset gone; the Review page shows them with no error and no exception."""
    import json
    import shutil

    from review_fixtures import PASSWORDS as passwords

    from magicid.reviews import add_reviewer

    folder = _evaluate_generations(tmp_path / "project", monkeypatch)
    assert folder == Path("reports/eval/generations/v1")
    lines = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    for record in lines:
        paths = [record["image_path"], record["pre_diir_path"], *record["reference_paths"]]
        assert all(not Path(p).is_absolute() and ".." not in Path(p).parts for p in paths), paths
        assert all(p.startswith("references/") for p in record["reference_paths"])
        assert [f"references/{r['face_id']}.png" for r in record["references"]] == record["reference_paths"]
        assert all((folder / p).is_file() for p in paths)
    shutil.rmtree("data")  # the folder is self-contained: nothing points into the dataset
    add_reviewer("reviewers.yaml", "alice", passwords["alice"])
    _write_params(tmp_path, monkeypatch, {"db_url": f"sqlite:///{tmp_path / 'reviews.db'}",
                                          "generations_dir": "reports/eval/generations",
                                          "reviewers_file": "reviewers.yaml"})  # fmt: skip
    app = _signed_in("alice")
    assert not app.exception and not app.error, [e.value for e in app.error]
    first = min(lines, key=lambda r: r["generation_id"])
    assert app.main.selectbox[0].value == first["generation_id"]
    shown = [url for image in app.main.image for url in image.value]
    assert len(shown) == len(first["reference_paths"]) + 2  # references, the generation, before DIIR
    _rate(app, 4, 4, comment="references load")
    assert (
        not app.error
        and "references load"
        == ReviewStore(f"sqlite:///{tmp_path / 'reviews.db'}").rating("alice", first["generation_id"]).comment
    )
    # Compare after a first evaluation: one version; the page says how to get a second one.
    _page(app, "Compare")
    note = " ".join(i.value for i in app.info)
    assert "Only model version 1 has generations" in note and "magicid train" in note
    assert "magicid evaluate" in note and not app.error


# -- sign-in limits through the app ------------------------------------------------------------------------


def test_a_name_is_locked_out_after_its_failed_sign_ins(review_env, tmp_path, monkeypatch):
    _write_params(tmp_path, monkeypatch, {
        "db_url": review_env["db_url"], "generations_dir": str(review_env["generations_dir"]),
        "reviewers_file": str(review_env["reviewers_file"]), "sign_in_max_failures_per_name": 3,
    })  # fmt: skip
    for attempt in range(3):
        app = _sign_in(_app(), "alice", f"wrong-guess-{attempt}")
        assert app.error and "Wrong reviewer name or password" in app.error[0].value
    app = _sign_in(_app(), "alice", PASSWORDS["alice"])  # the right password, a new session: still refused
    assert not app.exception and "reviewer" not in app.session_state
    assert "too many failed sign" in app.error[0].value and "try again in 15 minutes" in app.error[0].value
    assert len(app.sidebar.radio) == 0 and not app.image
    assert _signed_in("bob").session_state["reviewer"] == "bob"  # another name is not locked


def test_a_client_is_locked_out_after_failures_across_names(review_env, tmp_path, monkeypatch):
    _write_params(tmp_path, monkeypatch, {
        "db_url": review_env["db_url"], "generations_dir": str(review_env["generations_dir"]),
        "reviewers_file": str(review_env["reviewers_file"]), "sign_in_max_failures_per_client": 3,
    })  # fmt: skip
    for name in ("mallory", "alice", "bob"):
        assert "Wrong reviewer" in _sign_in(_app(), name, "wrong-guess-1").error[0].value
    app = _sign_in(_app(), "alice", PASSWORDS["alice"])
    assert "reviewer" not in app.session_state and "too many failed sign" in app.error[0].value


# -- untrusted text and images ---------------------------------------------------------------------------

HOSTILE = "![x](http://127.0.0.1:9/x.png) [link](http://example.invalid) **bold** :red[red] $x$"


def _unescaped(body: str) -> str:
    """A Markdown body as the text it renders (`plain_markdown` escapes punctuation with backslashes)."""
    import re

    return re.sub(r"\\(.)", r"\1", body)


def _markdown_elements(app) -> list[str]:
    """The bodies of every element Streamlit renders as Markdown (alerts, captions, headers, markdown)."""
    kinds = ("markdown", "caption", "success", "info", "warning", "error", "header", "subheader", "title")
    return [element.value for kind in kinds for element in getattr(app, kind)]


def test_text_from_manifests_and_comments_is_plain_text_on_every_page(tmp_path, monkeypatch):
    """A crafted prompt, generation id, model version and comment: in every Markdown element of every page
    they arrive escaped (rendered, no link or image), and the prompt is shown verbatim with st.text."""
    from markdown_it import MarkdownIt

    from magicid.reviews import write_generation_manifest

    fixture = build_generation_set(tmp_path)
    root = fixture["generations_dir"]
    records = []
    for record in fixture["records"]:
        version = record["model_version"]
        records.append({**record, "prompt": f"{record['prompt']} {HOSTILE}",
                        "generation_id": f"{record['generation_id']} ![g](http://127.0.0.1:9/g.png)",
                        "model_version": f"{version} ![v](http://127.0.0.1:9/v.png)"})  # fmt: skip
    write_generation_manifest(root, records)
    review_env = {"db_url": f"sqlite:///{tmp_path / 'reviews.db'}", "generations_dir": str(root),
                  "reviewers_file": str(fixture["reviewers_file"])}  # fmt: skip
    _write_params(tmp_path, monkeypatch, review_env)
    renderer = MarkdownIt("commonmark").enable(["table", "strikethrough"])

    def check(app):
        assert not app.exception, app.exception
        for body in _markdown_elements(app):
            rendered = renderer.render(body)
            assert "<img" not in rendered and "<a " not in rendered and "<strong>bold" not in rendered, body

    app = _signed_in("alice")
    check(app)
    assert any(HOSTILE in t.value for t in app.main.text)  # verbatim, as plain text
    _rate(app, 3, 3, comment=f"comment {HOSTILE}")
    check(app)
    assert any("Saved your rating" in s.value for s in app.success)
    for page in ("Compare", "Leaderboard", "My history"):
        check(_page(app, page))
        if page == "Compare":
            next(b for b in app.button if b.label.startswith("Tie")).click().run()
            check(app)
            assert any("Left was model version" in s.value for s in app.success)
        if page == "My history":
            assert any(f"comment {HOSTILE}" in t.value for t in app.text)


def test_images_the_app_refuses_are_inline_errors_and_never_reach_streamlit(tmp_path, monkeypatch):
    """A stored generation whose image lies outside the generations root (a row from another root, or from
    before the path rule), a damaged image and an oversized one: each is a one-line error naming the file
    (no server path), the page goes on, and Streamlit's media store never receives their pixels."""
    from PIL import Image
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    from magicid.reviews import GenerationRecord, read_generation_manifest

    fixture = build_generation_set(tmp_path)
    root = fixture["generations_dir"]
    secret = tmp_path / "secret.png"
    Image.new("RGB", (160, 160), (255, 0, 255)).save(secret)  # magenta: found if ever handed to Streamlit
    Image.new("RGB", (400, 400), (255, 0, 255)).save(root / "v2" / "huge.png")
    (root / "v2" / "case1_raw.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    store = ReviewStore(f"sqlite:///{tmp_path / 'reviews.db'}")
    records = {r.generation_id: r for r in read_generation_manifest(root)}
    store.register_generations(records.values())
    # Rows written straight to the store, as an older app or another generations root would have left them.
    store.register_generations([
        GenerationRecord(**{**records["v2-case0"].model_dump(), "image_path": str(secret)}),
        GenerationRecord(**{**records["v2-case2"].model_dump(), "image_path": str(root / "v2" / "huge.png"),
                            "pre_diir_path": str(root / ".." / "secret.png")}),
    ])  # fmt: skip
    # The manifest's mtime is the sync cache key: the app registers the manifest again but keeps these rows.
    (root / "manifest.jsonl").unlink()
    (root / "v2" / "manifest.jsonl").write_text("")
    _write_params(tmp_path, monkeypatch, {"db_url": store.url, "generations_dir": str(root),
                                          "reviewers_file": str(fixture["reviewers_file"])},
                  data={"max_pixels": 200 * 200})  # fmt: skip
    handed: list[bytes] = []
    original = MemoryMediaFileStorage.load_and_get_id

    def spy(self, path_or_data, mimetype, kind, filename=None):
        handed.append(path_or_data)
        return original(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", spy)
    app = _signed_in("alice")
    errors = [_unescaped(e.value) for e in app.error]
    assert any("is outside the generations folder" in e and "secret.png" in e for e in errors), errors
    for generation_id in ("v2-case1", "v2-case2"):
        app.main.selectbox[0].set_value(generation_id).run()
        assert not app.exception, app.exception
        errors += [_unescaped(e.value) for e in app.error]
    assert any("before DIIR: v2/case1_raw.png: not an image that can be shown" in e for e in errors), errors
    assert any(
        "generation (after DIIR), face boxes in green: v2/huge.png: too large to show" in e for e in errors
    )
    assert sum("is outside the generations folder" in e for e in errors) == 2, errors
    assert all(str(tmp_path) not in e and "Traceback" not in e for e in errors)
    assert app.image  # the rest of each page is still shown
    assert handed and all(isinstance(data, bytes) for data in handed)  # bytes the app checked, never a path
    import io

    for data in handed:
        pixels = Image.open(io.BytesIO(data)).convert("RGB").getdata()
        assert (255, 0, 255) not in set(pixels), "a refused image reached Streamlit's media store"
