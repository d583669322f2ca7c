"""`python -m magicid ...`: the library's commands (the `magicid` console script adds `demo` and `serve-flows`,
which live with the flows in `flows/cli.py`)."""

from magicid.cli import app

app(prog_name="magicid")
