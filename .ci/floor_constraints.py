"""Print pip constraints that pin every runtime and test dependency of
pyproject.toml to its declared lower bound (`>=X` and `==X` become `==X`).

CI installs the package with these constraints into a separate venv and runs the
suite there, so the floors in pyproject.toml are the versions that are tested.
"""

import pathlib
import re
import sys
import tomllib


REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)$")


def lower_bound(requirement: str) -> str | None:
    match = REQUIREMENT.match(requirement.split(";")[0])
    if match is None:
        raise ValueError(f"cannot read the requirement {requirement!r}")
    name, _, specifiers = match.groups()
    for specifier in specifiers.split(","):
        specifier = specifier.strip()
        if specifier.startswith((">=", "==")):
            return f"{name}=={specifier[2:].strip()}"
    return None


def main() -> None:
    root = pathlib.Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = sys.argv[1:] or ["test"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    pins = {}
    for requirement in requirements:
        pin = lower_bound(requirement)
        if pin is None:
            raise SystemExit(f"{requirement!r} declares no lower bound")
        pins[pin.split("==")[0].lower()] = pin
    print("\n".join(sorted(pins.values())))


if __name__ == "__main__":
    main()
