"""End to end in a real headless Chromium (Debian's, via Playwright): sign in, rate a generation with the
keyboard, make a blind pairwise choice; every image must really load (`naturalWidth > 0`: AppTest cannot see a
broken `/media` image, which starlette >= 1.5 causes) and the face boxes must be drawn on the generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image
from review_fixtures import PASSWORDS, build_generation_set

from magicid.reviews import ReviewStore
from tests.dashboards.conftest import streamlit_server, wait_for_images

APP = Path(__file__).resolve().parents[2] / "dashboards" / "review.py"

# The box colour sampled back from the displayed image through a canvas (same-origin /media, so readable).
PIXELS_JS = """
(img, points) => {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);
  return points.map(([x, y]) => Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3)));
}
"""


def _edge_points(box):
    """A point on each of the four sides of a box outline (the outline is drawn inside the box, 2 px wide)."""
    x0, y0, x1, y1 = (round(v) for v in box)
    mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
    return [(x0, mid_y), (x1 - 1, mid_y), (mid_x, y0), (mid_x, y1 - 1)]


@pytest.mark.slow
def test_sign_in_rate_and_compare_in_chromium(tmp_path, chromium_page):
    fixture = build_generation_set(tmp_path)
    db_url = f"sqlite:///{tmp_path / 'reviews.db'}"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump(
            {
                "review": {
                    "db_url": db_url,
                    "generations_dir": str(fixture["generations_dir"]),
                    "reviewers_file": str(fixture["reviewers_file"]),
                },
                "tracking": {"uri": f"sqlite:///{tmp_path / 'no-mlflow.db'}"},
            }
        )
    )
    page = chromium_page
    with streamlit_server(APP, ["--params", str(params_file)], tmp_path / "streamlit.log") as url:
        page.goto(url)
        page.get_by_role("textbox", name="Reviewer").fill("alice")
        page.get_by_role("textbox", name="Password").fill(PASSWORDS["alice"])
        page.get_by_role("button", name="Sign in").click()

        # Review page: references, the generation and its pre-DIIR image all decode in the browser.
        page.get_by_text("3 unrated of 3 generations of model version 2").wait_for()
        wait_for_images(page, 3)
        record = next(r for r in fixture["records"] if r["generation_id"] == "v2-case0")
        generation_img = '[data-testid="stImageContainer"]:has-text("generation (after DIIR)") img'
        points = [p for box in record["boxes"] for p in _edge_points(box)]
        shown = page.locator(generation_img).evaluate(PIXELS_JS, points)
        assert all(rgb == [0, 255, 0] for rgb in shown), shown  # the app drew the boxes...
        source = Image.open(fixture["generations_dir"] / record["image_path"]).convert("RGB")
        assert all(source.getpixel(p) != (0, 255, 0) for p in points)  # ...they are not in the file

        # Rate with the keyboard: arrow keys move a score, Ctrl+Enter saves.
        page.get_by_role("radio", name="3").first.focus()
        page.keyboard.press("ArrowRight")  # identity 3 -> 4
        page.get_by_role("textbox", name="Comment (plain text)").fill("boxes fine")
        page.evaluate("document.activeElement && document.activeElement.blur()")  # shortcuts skip inputs
        page.keyboard.press("Control+Enter")
        page.get_by_text("Saved your rating of v2-case0.").wait_for()
        page.get_by_text("2 unrated of 3").wait_for()
        wait_for_images(page, 3)

        # Blind compare: two images, no versions, then choose with the keyboard ("1" = left is better).
        page.get_by_text("Compare", exact=True).click()
        page.get_by_role("button", name="Left is better").wait_for()
        page.get_by_text("3 pairs left to judge").wait_for()
        wait_for_images(page, 3)
        assert page.get_by_text("model version").count() == 0
        page.evaluate("document.activeElement && document.activeElement.blur()")  # shortcuts skip inputs
        page.keyboard.press("1")
        page.get_by_text("): left. Left was model version").wait_for()
        page.get_by_text("2 pairs left to judge").wait_for()
        wait_for_images(page, 3)
        page.screenshot(path=str(tmp_path / "review_compare.png"), full_page=True)

    store = ReviewStore(db_url)
    rating = store.rating("alice", "v2-case0")
    assert (rating.identity_score, rating.overall_score, rating.comment) == (4, 3, "boxes fine")
    (judgement,) = store.history("alice")[1]
    assert judgement.choice == "left" and {judgement.left_version, judgement.right_version} == {"1", "2"}
    assert (tmp_path / "review_compare.png").stat().st_size > 10_000


@pytest.mark.slow
def test_hostile_text_renders_as_text_and_refused_images_stay_out_in_chromium(tmp_path, chromium_page):
    """Markdown in prompts, generation ids, model versions and comments never makes the browser fetch
    anything (a loopback server counts the requests: none), and is shown as the characters typed; an image
    outside the generations root is a one-line inline error while every image shown decodes."""
    import http.server
    import threading

    from magicid.reviews import GenerationRecord, read_generation_manifest, write_generation_manifest

    hits: list[str] = []

    class Counter(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bait = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        fixture = build_generation_set(tmp_path)
        root = fixture["generations_dir"]
        records = [
            {**r, "prompt": f"{r['prompt']} ![p]({bait}/prompt.png) [link]({bait}/link) **bold**",
             "generation_id": f"{r['generation_id']} ![g]({bait}/id.png)",
             "model_version": f"{r['model_version']} ![v]({bait}/v.png)"}
            for r in fixture["records"]
        ]  # fmt: skip
        write_generation_manifest(root, records)
        db_url = f"sqlite:///{tmp_path / 'reviews.db'}"
        store = ReviewStore(db_url)
        store.register_generations(read_generation_manifest(root))
        # A row the manifest does not list (left by another generations root): its image is outside this one.
        secret = tmp_path / "secret.png"
        Image.new("RGB", (160, 160), (255, 0, 255)).save(secret)
        template = next(r for r in read_generation_manifest(root) if r.generation_id.startswith("v2-case0"))
        store.register_generations(
            [
                GenerationRecord(
                    **{**template.model_dump(), "generation_id": "v2-0-outside", "image_path": str(secret)}
                )
            ]
        )
        params_file = tmp_path / "params.yaml"
        params_file.write_text(yaml.safe_dump({
            "review": {"db_url": db_url, "generations_dir": str(root),
                       "reviewers_file": str(fixture["reviewers_file"])},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'no-mlflow.db'}"},
        }))  # fmt: skip
        page = chromium_page
        with streamlit_server(APP, ["--params", str(params_file)], tmp_path / "streamlit.log") as url:
            page.goto(url)
            page.get_by_role("textbox", name="Reviewer").fill("alice")
            page.get_by_role("textbox", name="Password").fill(PASSWORDS["alice"])
            page.get_by_role("button", name="Sign in").click()
            # The refused image: a one-line error with no server path; the references and the pre-DIIR image load.
            refusal = page.get_by_text("image 'secret.png' is outside the generations folder")
            refusal.wait_for()
            assert str(tmp_path) not in refusal.inner_text()
            wait_for_images(page, 2)
            # Rate it and the next one, with a Markdown comment: the flash messages quote the hostile id.
            for comment in ("first", f"![c]({bait}/comment.png) see [here]({bait}/here)"):
                page.get_by_role("textbox", name="Comment (plain text)").fill(comment)
                page.evaluate("document.activeElement && document.activeElement.blur()")
                page.keyboard.press("Control+Enter")
                page.get_by_text("Saved your rating of").wait_for()
                wait_for_images(page, 2)
            page.get_by_text(f"Saved your rating of v2-case0 ![g]({bait}/id.png).").wait_for()
            assert page.get_by_text(f"![p]({bait}/prompt.png) [link]({bait}/link) **bold**").count() >= 1
            page.get_by_text("Compare", exact=True).click()
            page.get_by_role("button", name="Left is better").wait_for()
            wait_for_images(page, 3)
            page.evaluate("document.activeElement && document.activeElement.blur()")
            page.keyboard.press("2")
            page.get_by_text(f"![v]({bait}/v.png), right was model version").wait_for()
            for name in ("Leaderboard", "My history"):
                page.get_by_text(name, exact=True).click()
                page.get_by_role("heading", name=name).first.wait_for()
            page.get_by_text(f"![c]({bait}/comment.png)").first.wait_for()
            page.screenshot(path=str(tmp_path / "hostile.png"), full_page=True)
            links = page.evaluate(
                "(bait) => Array.from(document.querySelectorAll('a[href], img[src]'))"
                ".map(e => e.href || e.src).filter(u => u.startsWith(bait))",
                bait,
            )
            assert links == []
    finally:
        server.shutdown()
    assert hits == [], f"the browser fetched {hits}"
