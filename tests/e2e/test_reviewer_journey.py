"""The reviewer's journey on the platform's own output, in a real Chromium (issue 27, item 1).

Nothing here is hand-written: the `retrain` flow runs twice on a small IDZoom version (so the registry holds two
model versions and the evaluation wrote generations of both, the champion's and the challenger's, on one
evaluation set), then a reviewer is added with the CLI, signs in to the review app, opens every page (no
exception box anywhere), rates three generations whose images all decode (`naturalWidth > 0`), judges one blind
pair, `magicid review-export` writes the aggregates as version tags, and `magicid promote` reads them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.dashboards.conftest import streamlit_server, wait_for_images

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "dashboards" / "review.py"
PASSWORD = "correct horse battery staple"
EXCEPTION_BOX = '[data-testid="stException"]'


def _settings() -> dict:
    """A small CPU run. Every store and output keeps its default, relative path, as after `make demo`: the run
    happens in the project folder, so its tracking store, review store and generations are this project's own."""
    return {
        "data": {"workers": 1},
        "model": {"resolution": 64, "device": "cpu", "id_crop_size": 32},
        "train": {"batch_size": 2, "steps": 2, "checkpoint_every": 2},
        "eval": {"reference_split": "train", "n_people": [1], "seeds": [1000], "n_prompts": 1},
        "tracking": {"experiment": "reviewer-journey"},
    }


def _cli(params_file: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "magicid", "--params", str(params_file), *args],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _no_exception_box(page, where: str) -> None:
    boxes = page.locator(EXCEPTION_BOX)
    assert boxes.count() == 0, f"{where}: exception box: {boxes.first.inner_text()[:500]}"


@pytest.mark.slow
def test_reviewer_journey_on_the_retrain_flows_own_output(tmp_path, monkeypatch, chromium_page):
    from skimage import data as skdata

    from flows.retrain import retrain_flow
    from magicid.data.sample import package_photo

    project = tmp_path / "project"
    raw = project / "data/raw"
    raw.mkdir(parents=True)
    monkeypatch.chdir(project)
    Image.fromarray(np.ascontiguousarray(skdata.astronaut())).save(raw / "astronaut.png")
    shutil.copy(package_photo("Tom_Hanks_54745.png"), raw / "tom_hanks.png")
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(_settings()))
    data_dir = "data/idzoom"  # relative, as the demo passes it: the manifests must not depend on that
    built = _cli(params_file, "build-data", "--input", "data/raw", "--out", data_dir, cwd=project)
    assert built.returncode == 0, built.stderr

    first = retrain_flow(project_dir=None, params_path=str(params_file), data_dir=data_dir, fit=False)
    # A second training run (another seed): a second model version, evaluated beside the champion.
    second = retrain_flow(
        project_dir=None, params_path=str(params_file), data_dir=data_dir, fit=False,
        overrides=["seed=1"],
    )  # fmt: skip
    versions = {first["model"]["version"], second["model"]["version"]}
    assert len(versions) == 2, (first["model"], second["model"])
    generations = project / "reports/eval/generations"
    manifests = sorted(generations.rglob("manifest.jsonl"))
    assert len(manifests) >= 2, manifests

    added = _cli(params_file, "review-add-reviewer", "alice", "--password", PASSWORD, cwd=project)
    assert added.returncode == 0, added.stderr

    page = chromium_page
    log = tmp_path / "streamlit.log"
    with streamlit_server(APP, ["--params", str(params_file)], log) as url:
        page.goto(url)
        page.get_by_role("textbox", name="Reviewer").fill("alice")
        page.get_by_role("textbox", name="Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("Signed in as").wait_for()

        # Review: three generations rated, each with its references and generation decoded in the browser.
        page.get_by_text("unrated of").first.wait_for()
        for rated in range(3):
            wait_for_images(page, 2)
            _no_exception_box(page, f"Review page, rating {rated + 1}")
            page.get_by_role("button", name="Save rating").click()
            page.get_by_text("Saved your rating of").wait_for()
        _no_exception_box(page, "Review page after three ratings")

        # Compare: a blind pair of the two versions (same prompt, identities and seed), judged.
        page.get_by_text("Compare", exact=True).click()
        page.get_by_role("button", name="Left is better").wait_for()
        wait_for_images(page, 2)
        _no_exception_box(page, "Compare page")
        page.get_by_role("button", name="Left is better").click()
        page.get_by_text("Left was model version").wait_for()

        for name in ("Leaderboard", "My history"):
            page.get_by_text(name, exact=True).click()
            page.wait_for_timeout(1500)
            page.wait_for_load_state("networkidle")
            _no_exception_box(page, f"{name} page")
        page.screenshot(path=str(tmp_path / "journey.png"), full_page=True)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]

    exported = _cli(params_file, "review-export", cwd=project)
    assert exported.returncode == 0, exported.stderr
    assert "ratings" in exported.stdout and "win" in exported.stdout, exported.stdout

    promoted = _cli(params_file, "promote", cwd=project)
    assert promoted.returncode in (0, 1), promoted.stderr  # 1: the gate said no; both are decisions
    assert "Traceback" not in promoted.stderr
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    challenger = client.get_model_version_by_alias("magicid", "challenger")
    review_tags = {k: v for k, v in challenger.tags.items() if k.startswith("review.")}
    assert review_tags, challenger.tags
