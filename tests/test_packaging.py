"""pyproject.toml and environment.yml declare the same packages; the layout is complete."""

import importlib.metadata
import re

from conftest import REPO_ROOT


def _normalise(requirement: str) -> str:
    """'Foo_Bar >= 1.0 ; extra == "x"' -> 'foo-bar>=1.0'."""
    requirement = requirement.split(";")[0].replace(" ", "")
    name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)
    return name.lower().replace("_", "-") + requirement[len(name):]


def pyproject_requirements() -> set[str]:
    """Runtime and test requirements as installed from pyproject.toml (works on 3.10 too)."""
    requirements = importlib.metadata.requires("tfcourse") or []
    return {_normalise(r) for r in requirements if "extra" not in r or 'extra == "test"' in r}


def conda_requirements() -> set[str]:
    names = set()
    text = (REPO_ROOT / "environment.yml").read_text()
    for line in text.split("dependencies:", 1)[1].splitlines():
        match = re.match(r"\s+-\s+([^\s#]+)", line)
        if match and not match.group(1).startswith(("python", "pip")):
            names.add(_normalise(match.group(1)))
    return names


def test_conda_and_pip_declare_the_same_packages():
    assert conda_requirements() == pyproject_requirements()


def test_mpi_runtime_is_a_declared_dependency():
    assert {r.split(">=")[0] for r in pyproject_requirements()} >= {"mpi4py", "mpich"}


def test_required_layout_exists():
    for folder in ["notebooks", "tfcourse", "exercises", "solutions", "tests", "benchmarks"]:
        assert (REPO_ROOT / folder).is_dir(), folder
    for name in ["environment.yml", "README.md", "pyproject.toml", "Makefile", ".ci/run"]:
        assert (REPO_ROOT / name).is_file(), name


def test_ci_runs_the_readme_test_command_and_nothing_else():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[-1] == "exec make test"
    assert "make test" in (REPO_ROOT / "README.md").read_text()


def test_readme_maps_every_notebook():
    readme = (REPO_ROOT / "README.md").read_text()
    for notebook in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{notebook.name}" in readme, notebook.name
