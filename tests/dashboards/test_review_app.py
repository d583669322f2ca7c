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
def review_env(tmp_path, monkeypatch):
    fixture = build_generation_set(tmp_path)
    db_url = f"sqlite:///{tmp_path / 'reviews.db'}"
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
