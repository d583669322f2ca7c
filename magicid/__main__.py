"""`python -m magicid ...`: the same CLI as the `magicid` command."""

from magicid.cli import app

app(prog_name="magicid")
