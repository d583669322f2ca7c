"""Streamlit app: browse an IDZoom dataset version — images with their condition maps, zoomed face crops,
quarantined inputs and stats. Thin: all reading goes through `magicid.data.manifest`.

Run: `.venv/bin/streamlit run dashboards/idzoom_browser.py -- --root data/idzoom`
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import streamlit as st

from magicid.data.manifest import CONDITIONS_DIR, STATS, read_manifest, read_quarantine
from magicid.errors import DataError


def _root() -> Path:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="data/idzoom")
    args, _ = parser.parse_known_args()
    return Path(st.sidebar.text_input("Dataset version", args.root))


def main() -> None:
    st.set_page_config(page_title="IDZoom browser", layout="wide")
    st.title("IDZoom browser")
    root = _root()
    try:
        images, faces = read_manifest(root, arrays=False)
    except DataError as error:
        st.error(str(error))
        return

    stats_path = root / STATS
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        cols = st.columns(3)
        cols[0].metric("images", len(images))
        cols[1].metric("faces", len(faces))
        cols[2].metric("quarantined", stats.get("n_quarantined", "?"))
    if len(faces):
        st.subheader("Face size (face box area / image area): the zoom axis")
        st.bar_chart(faces["face_area_ratio"].round(3).value_counts().sort_index())

    st.subheader("Images")
    if len(images):
        image_id = st.selectbox("image", images["image_id"].tolist())
        row = images.set_index("image_id").loc[image_id]
        left, middle, right = st.columns(3)
        left.image(str(root / row["path"]), caption=f"{row['source']} ({row['split']})")
        middle.image(str(root / CONDITIONS_DIR / f"{image_id}_skeleton.png"), caption="skeleton map")
        right.image(str(root / CONDITIONS_DIR / f"{image_id}_landmark.png"), caption="landmark map")
        own = faces[faces["image_id"] == image_id]
        if len(own):
            st.image([str(root / p) for p in own["crop_path"]], caption=own["face_id"].tolist(), width=128)

    st.subheader("Quarantine")
    st.dataframe(read_quarantine(root), use_container_width=True)


main()
