"""A pickle that runs code when loaded without `weights_only=True`: what a crafted checkpoint would hold."""

from __future__ import annotations

from pathlib import Path


class RunsCode:
    """Unpickling this calls `exec`, which writes `marker`: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def save_crafted(path: Path, marker: Path, **state) -> Path:
    """torch.save a dict holding a `RunsCode` under "payload" (plus `state`), and check that loading it the
    unsafe way really runs it (then remove the marker), so a test that finds no marker means something."""
    import torch

    torch.save({**state, "payload": RunsCode(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran", "the crafted pickle did not run its code when unpickled"
    marker.unlink()
    return path
