"""The README's screenshots are what the suite renders, and the README links only to files that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Largest share of pixels allowed to differ (font rasterising across library versions), far below what one
#: changed digit in the table changes.
MAX_CHANGED = 1e-4


def screenshots() -> ModuleType:
    spec = importlib.util.spec_from_file_location("funcpipe_docs_screenshots", DOCS / "screenshots.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_screenshots_are_what_the_suite_renders(tmp_path: Path) -> None:
    rendered = screenshots().render(tmp_path)
    assert set(rendered) == {"plan_table", "timeline"}
    for path in rendered.values():
        committed = DOCS / path.name
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert committed.is_file(), f"{committed} is missing; run python docs/screenshots.py"
        assert path.stat().st_size < 200_000 and committed.stat().st_size < 200_000
        new, old = pixels(path), pixels(committed)
        assert new.shape == old.shape, f"{path.name} changed size; run python docs/screenshots.py and commit it"
        changed = float((np.abs(new - old).max(axis=2) > 32).mean())
        assert changed <= MAX_CHANGED, f"{changed:.4%} of {path.name} changed; run python docs/screenshots.py"


def test_plan_table_screenshot_shows_the_plans_table() -> None:
    module = screenshots()
    figure = module.text_figure("Plan: $0.01 and $0.02\n  stage  layers")
    texts = [t.get_text() for t in figure.texts]
    assert texts == [r"Plan: \$0.01 and \$0.02", "  stage  layers"]  # escaped, or mathtext eats the dollars
    assert figure.get_size_inches()[0] > figure.get_size_inches()[1]


def test_readme_shows_the_screenshots_and_links_only_to_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert {"docs/plan_table.png", "docs/timeline.png"} <= set(images)
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert "examples/quickstart.ipynb" in local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == []


def quickstart_commands() -> list[str]:
    """The README's quickstart commands, one per numbered comment."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_each_quickstart_command_installs_the_cpu_torch_first_and_what_it_runs() -> None:
    import configparser

    extras = configparser.ConfigParser()
    extras.read(ROOT / "setup.cfg")
    requires = {name: value for name, value in extras["options.extras_require"].items()}
    commands = quickstart_commands()
    assert len(commands) == 3
    for command in commands:
        assert command.startswith("pip install torch==2.13.0 && pip install "), command  # else a CUDA build
    # What each runs comes with what it installs: funcpipe's own script, pytest, and a Jupyter front end.
    assert '".[demo]"' in commands[0] and "funcpipe demo" in commands[0]
    assert '".[dev]"' in commands[1] and "pytest" in requires["dev"]
    assert '".[notebook]"' in commands[2] and "jupyter lab " in commands[2]
    assert re.search(r"^\s*jupyterlab\b", requires["notebook"], re.MULTILINE), "jupyter lab needs jupyterlab"
