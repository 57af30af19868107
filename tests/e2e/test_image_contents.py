"""What the images install, checked without Docker: the package built the way the Dockerfiles
build it (only what they COPY, minus .dockerignore) holds every file the services read at run
time, the `loraplex` command and every module compose.yaml runs.

test_compose.py checks that the COPY sources exist; this checks they are enough. Package data
is the usual gap: a data file outside [tool.setuptools.package-data] is in the source tree,
so every test run from the checkout passes, and missing only from the image.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.e2e.test_compose import copy_sources, python_module, services

# Alembic reads script.py.mako only to write a new migration (`alembic revision`), never to run one.
NOT_NEEDED_AT_RUN_TIME = ("*.mako",)


def ignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rules as far as our .dockerignore uses them: a pattern matches a path or any
    folder above it; a leading **/ matches at any depth."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    for pattern in patterns:
        anywhere = pattern.startswith("**/")
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or anywhere and fnmatch.fnmatch(prefix.rsplit("/", 1)[-1], bare):
                return True
    return False


def context_files(dockerfile: str) -> list[str]:
    """Files of the build context the Dockerfile's COPY lines send into the image."""
    patterns, files = ignore_patterns(), []
    for source in copy_sources(REPO_ROOT / dockerfile):
        assert not ignored(source, patterns), f"{dockerfile}: COPY {source}, which .dockerignore leaves out"
        root = REPO_ROOT / source
        candidates = [root] if root.is_file() else sorted(path for path in root.rglob("*") if path.is_file())
        files += [relative for path in candidates
                  if not ignored(relative := path.relative_to(REPO_ROOT).as_posix(), patterns)]
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    context = tmp_path_factory.mktemp("context")
    for relative in context_files("Dockerfile"):
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / relative, context / relative)
    out = tmp_path_factory.mktemp("wheel")
    # The image runs `pip install /src`; without build isolation pip uses this venv's setuptools
    # instead of downloading one, and builds the same wheel.
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(context)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the image's `pip install /src` would fail:\n{result.stderr}"
    (built,) = out.glob("loraplex-*.whl")
    return zipfile.ZipFile(built)


def test_both_images_copy_the_same_application():
    assert context_files("Dockerfile") == context_files("Dockerfile.gpu")


def test_the_image_installs_every_file_the_services_read(wheel):
    installed = set(wheel.namelist())
    shipped = [name for name in context_files("Dockerfile") if name.startswith("services/")]
    missing = [name for name in shipped if name not in installed
               and not any(fnmatch.fnmatch(name, pattern) for pattern in NOT_NEEDED_AT_RUN_TIME)]
    assert not missing, f"in the source tree but not installed in the image: {missing}"
    assert any(name.startswith("services/demo/data/") for name in installed)


def test_the_image_has_the_loraplex_command_and_every_module_compose_runs(wheel):
    installed = set(wheel.namelist())
    (entry_points,) = [name for name in installed if name.endswith(".dist-info/entry_points.txt")]
    assert "loraplex = services.cli:main" in wheel.read(entry_points).decode()
    modules = {python_module(name)[0] for name in services() if "build" in services()[name] and python_module(name)}
    modules.add("services.common.healthcheck")  # every health check runs it
    for module in sorted(modules):
        path = module.replace(".", "/")
        assert f"{path}/__main__.py" in installed or f"{path}.py" in installed, f"the image has no {module}"
