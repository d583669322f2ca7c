"""The demo: the main job on embedded offline defaults (`make demo`)."""

from __future__ import annotations

from pathlib import Path

from magicid.config import Params
from magicid.generate import generate_to_file


def run_demo(params: Params, out_dir: str | Path) -> dict[str, str]:
    """Build the tiny backbone and generate one image. Later stages extend this to the full pipeline.

    Returns:
        A summary mapping of what was produced (printed by the CLI).
    """
    out_dir = Path(out_dir)
    image_path = generate_to_file(params, "a photo of a person smiling", params.seed, out_dir / "generated.png")
    return {"backbone": params.model.backbone, "generated": str(image_path)}
