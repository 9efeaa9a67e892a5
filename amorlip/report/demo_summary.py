"""``amorlip demo-summary``: what a person sees at the end of ``make demo``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def print_demo_summary(config: Mapping[str, Any]) -> None:
    """Print summary.md (every gain with its noise), where the outputs are, and the command that opens
    MLflow."""
    results_dir = Path(config["paths"]["results"])
    md = results_dir / "summary.md"
    if not md.exists():
        print(f"No summary yet ({md} not found): run the pipeline first (make demo).")
        return
    print(md.read_text())
    print("Outputs:")
    print(f"  table   {results_dir / 'summary.csv'}  and  {md}")
    print(f"  plots   {results_dir / 'plots'}/")
    print(f"  per run {results_dir}/<run>/<suite>.json, {config['paths']['runs']}/<run>/train.json")
