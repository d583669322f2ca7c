"""What the review app shows from untrusted manifests: Markdown-escaped text."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Markdown's inline syntax (emphasis, code, links, images, HTML, autolinks, strikethrough, Streamlit's
# `:directives:` and `$math$`) and its block markers at a line's start (#, +, >, "1." or "1)").
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+.!|<>~:$&])")


def plain_markdown(text: str) -> str:
    """`text` escaped so that a Markdown renderer (Streamlit's GitHub-flavoured one, with its `:directives:`
    and `$math$`) shows it as the characters it is: no link, image, emphasis, heading, HTML or directive.

    Every ASCII punctuation character that Markdown gives a meaning gets a backslash (CommonMark renders a
    backslash-escaped punctuation character as itself); line breaks become spaces and leading blanks are
    dropped, so a text cannot start a block of its own. For text from manifests, prompts, comments and
    error messages quoting them, shown inside the app's own messages; text shown on its own goes through
    `st.text`, which renders nothing.
    """
    # Leading blanks would indent: 4 make a code block, fewer let a "-" start a list item.
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()).lstrip())
    # "-" and "=" mean something only at the start of a line (a list item, a rule): escaped there only, so
    # ids like v2-case0 stay readable in the Markdown source.
    return "\\" + escaped if escaped[:1] in ("-", "=") else escaped


def draw_face_boxes(image, boxes: Sequence[Sequence[float]], color=(0, 255, 0), width: int | None = None):
    """A copy of a PIL image with each face box outlined (x0, y0, x1, y1 in pixels; RGB result)."""
    from PIL import ImageDraw

    out = image.convert("RGB")
    line = width if width is not None else max(2, round(min(out.size) / 128))
    draw = ImageDraw.Draw(out)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line)
    return out
