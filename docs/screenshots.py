"""Render the README's screenshots: a plan's table (as a terminal shows it) and its pipeline timeline.

    python docs/screenshots.py            # rewrites docs/plan_table.png and docs/timeline.png

The plan is one of the cost–time frontier of AmoebaNet-D18 on AWS Lambda that
``benchmarks/paper.py`` found (``benchmarks/results/paper.json``), simulated
with its saved profile (``benchmarks/profiles/amoebanet_d18.json``): 3 stages,
8 functions, global batch 64 in micro-batches of 4, a data set of 50,000
images. ``tests/test_docs.py`` renders both again and checks that the
committed files are what it renders.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from matplotlib.figure import Figure

import funcpipe
from funcpipe.plot import timeline_figure

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "benchmarks" / "profiles" / "amoebanet_d18.json"
PLAN = funcpipe.Plan.manual([16, 4, 4], replicas=[4, 2, 2], micro_batch_size=4, global_batch_size=64,
                            memory_mb=[10240, 8192, 10240])
SAMPLES = 50_000
DPI = 100
#: PNG metadata left out, so the same figure gives the same bytes.
METADATA = {"Software": None}


def text_figure(text: str, *, font_size: float = 10.0) -> Figure:
    """Text in a monospace font on a light terminal-like panel, sized to fit its longest line.

    Dollar signs are escaped: two in a line would start matplotlib's mathtext.
    """
    lines = text.splitlines()
    char_in = 0.6 * font_size / 72  # DejaVu Sans Mono's advance is 0.6 em
    line_in = 1.3 * font_size / 72
    pad = 0.2
    width = max(len(line) for line in lines) * char_in + 2 * pad
    height = len(lines) * line_in + 2 * pad
    figure = Figure(figsize=(width, height), facecolor="#fbfbf8")
    for i, line in enumerate(lines):
        figure.text(pad / width, 1 - (pad + (i + 0.8) * line_in) / height, line.replace("$", r"\$"),
                    family="DejaVu Sans Mono",
                    fontsize=font_size, color="#1d1d1d", weight="bold" if i == 0 else "normal")
    return figure


def render(directory: Path) -> dict[str, Path]:
    """Write plan_table.png and timeline.png into ``directory``; their paths by name."""
    profile = funcpipe.ModelProfile.load(PROFILE)
    simulation = funcpipe.simulate(PLAN, profile, "aws_lambda")
    plan = dataclasses.replace(simulation.plan, samples=SAMPLES)
    paths = {"plan_table": directory / "plan_table.png", "timeline": directory / "timeline.png"}
    text_figure(f">>> print(plan)\n{plan}").savefig(paths["plan_table"], dpi=DPI, metadata=METADATA)
    timeline = timeline_figure(simulation.timeline, title="AmoebaNet-D18 on AWS Lambda: one iteration of the plan")
    timeline.savefig(paths["timeline"], dpi=DPI, bbox_inches="tight", metadata=METADATA)
    return paths


if __name__ == "__main__":
    for path in render(Path(__file__).resolve().parent).values():
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KB)", file=sys.stderr)
