"""What the review app shows from untrusted manifests: Markdown-escaped text (face boxes are drawn with
`magicid.imaging.boxes.draw_boxes`)."""

from __future__ import annotations

import re

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
