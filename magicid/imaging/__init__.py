"""Neutral image geometry shared by faces/, data/, models/ and restore/ (DESIGN §1).

`crops`: square face crops grown by a margin, zoomed to a size (IDZoom's zoom, DIIR's restore crops, the
ID encoder's identity crops); `conditions`: the MMF ControlNet's skeleton and landmark map rendering, and
the 478-point face-mesh template a box-only layout is drawn with; `boxes`: checks, IoU, box masks,
the default layout and drawing boxes; `layout`: `FaceLayout` and the boxes a condition map implies; `images`: the
one PIL-or-uint8 coercion. Imports none of faces/, data/, models/,
restore/, training/ (tests/imaging/test_layering.py checks it).
"""
