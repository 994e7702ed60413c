"""backends/*/Dockerfile: what each image installs resolves for the image's platform, and is all the function imports.

There is no Docker engine here, so the images are not built; pip resolves what
they install instead (``pip install --dry-run --report``, which installs and
keeps nothing). The inputs are read from the files the images are built from,
not copied: the base image and ``TORCH_VERSION`` from each Dockerfile, the
packages from ``backends/<platform>/requirements.txt``.

1. On this machine, the image's requirements plus ``torch==TORCH_VERSION``
   resolve, with their dependencies, to the distributions the image gets
   (pip refuses ``--platform`` with dependencies that come as source, as oss2
   and crcmod do; this machine is Debian 12 with CPython 3.11, like the bases).
2. Every wheel among them has a release for the image's Python on the
   manylinux tags its base's glibc satisfies (``--no-deps --only-binary=:all:
   --platform ...``), so ``docker build`` finds it. Packages that come as
   source only must be built by the Dockerfile (it has a stage with a
   compiler). The same check on Amazon Linux 2's glibc 2.26, the old Lambda
   base, fails: torch 2.13's wheel is manylinux_2_28.
3. The function's entry (``backends/<platform>/handler.py`` / ``server.py``)
   imports and preloads, and a tensor goes through the codec and a function
   through cloudpickle, with only those distributions importable.

torch comes from pip's configured indexes here (the Dockerfile takes the CPU
build from PyTorch's CPU index, which this machine cannot reach); the CPU and
CUDA wheels of a release carry the same manylinux tag.
"""

from __future__ import annotations

import configparser
import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

import funcpipe

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ("alibaba_fc", "aws_lambda")

#: Debian release of a ``python:X.Y-slim-<release>`` base -> its glibc (major, minor).
DEBIAN_GLIBC = {"bullseye": (2, 31), "bookworm": (2, 36), "trixie": (2, 41)}
#: Amazon Linux 2, under ``public.ecr.aws/lambda/python:3.11``: the base the Lambda image had before.
AMAZON_LINUX_2_GLIBC = (2, 26)
#: The PEP 600 tags' older names: manylinux2014 = 2.17, manylinux2010 = 2.12, manylinux1 = 2.5.
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


@dataclasses.dataclass(frozen=True)
class Image:
    """What a Dockerfile says about the image it builds."""

    platform: str
    python: str  # "3.11"
    glibc: tuple[int, int]
    torch: str  # the default of ARG TORCH_VERSION
    requirements: Path
    compiles: bool  # a stage installs gcc, so packages that come as source only can be built

    @property
    def dockerfile(self) -> Path:
        return ROOT / "backends" / self.platform / "Dockerfile"


def read_image(name: str) -> Image:
    dockerfile = ROOT / "backends" / name / "Dockerfile"
    text = dockerfile.read_text(encoding="utf-8")
    bases = set(re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE))
    assert len(bases) == 1, f"{dockerfile}: every stage should build on one base, found {sorted(bases)}"
    base = bases.pop()
    match = re.fullmatch(r"python:(3\.\d+)-slim-([a-z]+)", base)
    assert match, f"{dockerfile}: base {base!r} is not python:3.X-slim-<debian release>"
    python, release = match.groups()
    assert release in DEBIAN_GLIBC, f"{dockerfile}: add Debian {release!r}'s glibc to DEBIAN_GLIBC"
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.MULTILINE)
    assert torch, f"{dockerfile}: no ARG TORCH_VERSION=<default>"
    requirements = ROOT / "backends" / name / "requirements.txt"
    assert f"-r /opt/funcpipe/backends/{name}/requirements.txt" in text, f"{dockerfile} does not install {requirements}"
    return Image(
        platform=name, python=python, glibc=DEBIAN_GLIBC[release], torch=torch.group(1), requirements=requirements,
        compiles=re.search(r"apt-get install[^\n]*\bgcc\b", text) is not None,
    )


def manylinux_tags(glibc: tuple[int, int]) -> list[str]:
    """The x86_64 platform tags a glibc satisfies, newest first.

    pip takes ``--platform manylinux_2_36_x86_64`` literally (it does not add the older tags a
    glibc 2.36 also satisfies, so a manylinux2014 wheel would not match): all of them are passed.
    """
    major, minor = glibc
    found = []
    for m in range(minor, 4, -1):
        found.append(f"manylinux_{major}_{m}_x86_64")
        if m in LEGACY_MANYLINUX:
            found.append(f"{LEGACY_MANYLINUX[m]}_x86_64")
    return found


def pip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        cwd=cwd, capture_output=True, text=True, timeout=240, check=False,
    )


@dataclasses.dataclass(frozen=True)
class Resolved:
    """One distribution the image gets, as resolved on this machine."""

    name: str
    version: str
    file: str  # what pip took here: a wheel, or a source distribution (which the image builds)

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel(self) -> bool:
        return self.file.endswith(".whl")


@functools.cache
def resolve(name: str, tmp: Path) -> tuple[Resolved, ...]:
    """Step 1: the image's requirements and torch pin, with their dependencies, resolved on this machine."""
    image = read_image(name)
    report = tmp / f"{name}.json"
    done = pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
               "-r", str(image.requirements), f"torch=={image.torch}", cwd=tmp)
    assert done.returncode == 0, f"{image.requirements} + torch=={image.torch} do not resolve:\n{done.stderr}"
    installs: list[dict[str, Any]] = json.loads(report.read_text(encoding="utf-8"))["install"]
    return tuple(
        Resolved(item["metadata"]["name"], item["metadata"]["version"],
                 unquote(item["download_info"]["url"].split("#")[0].rsplit("/", 1)[-1]))
        for item in installs
    )


def without_wheel(resolved: Sequence[Resolved], python: str, glibc: tuple[int, int], tmp: Path) -> list[str]:
    """Step 2: the pins that have no wheel for CPython ``python`` on the manylinux tags ``glibc`` satisfies.

    pip decides, for all the pins at once (``--no-deps``: the versions are step 1's). When it
    refuses, the culprits are named by asking it again for each pin whose wheel here does not fit
    the image (or for every pin, should none stand out).
    """

    def fits(group: Sequence[str]) -> bool:
        platforms = [arg for tag in manylinux_tags(glibc) for arg in ("--platform", tag)]
        return pip("install", "--dry-run", "--ignore-installed", "--quiet", "--no-deps", "--only-binary=:all:",
                   *platforms, "--python-version", python, "--implementation", "cp",
                   "--target", str(tmp / "target"), *group, cwd=tmp).returncode == 0

    if fits([r.pin for r in resolved]):
        return []
    version = tuple(int(part) for part in python.split("."))
    supported = {*tags.cpython_tags(version, platforms=manylinux_tags(glibc)),
                 *tags.compatible_tags(version, f"cp{version[0]}{version[1]}", manylinux_tags(glibc))}
    suspects = [r for r in resolved if not parse_wheel_filename(r.file)[3] & supported] or list(resolved)
    return [r.pin for r in suspects if not fits([r.pin])]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip(f"resolves on a machine like the images' (Linux x86_64), not {sys.platform} {platform.machine()}")
    return tmp_path_factory.mktemp("images")


@pytest.mark.registry
@pytest.mark.parametrize("name", IMAGES)
def test_what_the_image_installs_has_wheels_for_its_platform(name: str, tmp: Path) -> None:
    image = read_image(name)
    resolved = resolve(name, tmp)
    names = {canonicalize_name(r.name) for r in resolved}
    assert "torch" in names and not names & {"ray", "ortools", "matplotlib", "tqdm", "pyyaml"}, sorted(names)
    assert next(r.version for r in resolved if r.name == "torch").split("+")[0] == image.torch
    sources = [r.pin for r in resolved if not r.wheel]
    assert image.compiles or not sources, (
        f"{image.dockerfile} has no compiler, but these come as source only: {sources}"
    )
    missing = without_wheel([r for r in resolved if r.wheel], image.python, image.glibc, tmp)
    assert not missing, (
        f"no wheel for CPython {image.python} on glibc {'.'.join(map(str, image.glibc))} "
        f"({manylinux_tags(image.glibc)[0]} or older): {missing}"
    )


@pytest.mark.registry
def test_the_check_fails_on_amazon_linux_2(tmp: Path) -> None:
    # The Lambda image's old base: AWS's python:3.11 image, Amazon Linux 2 with glibc 2.26.
    image = read_image("aws_lambda")
    wheels = [r for r in resolve("aws_lambda", tmp) if r.wheel]
    missing = without_wheel(wheels, image.python, AMAZON_LINUX_2_GLIBC, tmp)
    assert any(pin.startswith(f"torch=={image.torch}") for pin in missing), missing


def image_site(allowed: set[str], where: Path) -> Path:
    """A site-packages of the image's distributions: symlinks to the files of those installed here.

    Of the distributions step 1 resolved, those this environment has; an image
    distribution missing here only makes the check stricter. funcpipe comes
    from its source tree instead, as the image installs it.
    """
    site = where / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name not in allowed or name == "funcpipe":
            continue
        assert dist.files is not None, f"{name} has no RECORD: cannot tell its files"
        for top in {file.parts[0] for file in dist.files} - {"..", "__pycache__"}:
            target, link = Path(str(dist.locate_file(top))), site / top
            if target.exists() and not link.exists() and not top.endswith(".pth"):
                link.symlink_to(target)
    return site


ENTRIES = {
    # handler.py imports the S3 adapter and preloads at import, as Lambda's init does.
    "aws_lambda": "import handler",
    # server.py's main() imports the OSS adapter (leniently: so here strictly) and preloads before it listens.
    "alibaba_fc": "import server; import funcpipe.storage.oss; server.preload()",
}

#: Run in ``python -S`` (no site-packages) after the entry: what a call does with what it receives and
#: sends (a tensor through the codec, a stage definition through cloudpickle), proof of the isolation,
#: and what loaded.
AFTER = textwrap.dedent("""
    import sys
    import torch
    from funcpipe import codec, signed
    tensor = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(codec.decode_tensor(codec.encode_tensor(tensor))[0], tensor)  # safetensors, numpy
    key = signed.new_key()
    assert signed.unseal(signed.seal(lambda x: x + 1, key, name="f"), key, name="f")(1) == 2  # cloudpickle
    try:  # installed in this environment (funcpipe's platform files need it), not in the image
        import yaml
    except ModuleNotFoundError:
        pass
    else:
        sys.exit("yaml imported: the function did not run with the image's packages only")
    print(",".join(sorted({m.partition(".")[0] for m in sys.modules} - set(sys.stdlib_module_names))))
""")


@pytest.mark.registry
@pytest.mark.parametrize("name", IMAGES)
def test_the_function_imports_only_what_the_image_installs(name: str, tmp: Path) -> None:
    allowed = {canonicalize_name(r.name) for r in resolve(name, tmp)}
    site = image_site(allowed, tmp / name)
    src = Path(funcpipe.__file__).parents[1]
    done = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, sys.argv[1]); {ENTRIES[name]}\n{AFTER}",
         str(ROOT / "backends" / name)],
        capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{src}"),
        cwd=tmp, check=False,
    )
    assert done.returncode == 0, f"the {name} function imports what its image lacks:\n{done.stderr}"
    loaded = set(done.stdout.strip().split(","))
    assert {"torch", "safetensors", "cloudpickle", "numpy", "funcpipe"} <= loaded, loaded  # it ran the function


def test_the_images_share_the_base_and_the_torch_the_suite_tests() -> None:
    lambda_image, fc_image = read_image("aws_lambda"), read_image("alibaba_fc")
    assert (lambda_image.python, lambda_image.glibc) == (fc_image.python, fc_image.glibc)
    assert lambda_image.torch == fc_image.torch
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    pinned = re.search(rf"torch=={re.escape(lambda_image.torch)}(?![\w.])", ci)
    assert pinned, f"TORCH_VERSION's default {lambda_image.torch} is not the torch .ci/run tests"
    for image in (lambda_image, fc_image):  # the comment about the base says what the check checks
        assert manylinux_tags(image.glibc)[0] in image.dockerfile.read_text(encoding="utf-8"), image.dockerfile


def test_requirements_bounds_are_setup_cfgs() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg", encoding="utf-8")
    lines = [setup["options"]["install_requires"], *setup["options.extras_require"].values()]
    declared = {canonicalize_name(r.name): r.specifier for r in _requirements("\n".join(lines))}
    for name in IMAGES:
        image = read_image(name)
        for req in _requirements(image.requirements.read_text(encoding="utf-8")):
            if canonicalize_name(req.name) in declared:
                assert req.specifier == declared[canonicalize_name(req.name)], f"{image.requirements}: {req}"


def _requirements(text: str) -> list[Requirement]:
    """The requirements of a requirements file or a setup.cfg list: one a line, comments after ``#``."""
    return [Requirement(line) for line in (raw.split("#")[0].strip() for raw in text.splitlines()) if line]
