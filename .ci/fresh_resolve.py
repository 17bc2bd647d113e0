"""Fail when a fresh install of the README's test command would test other versions than this machine has.

CI reuses the packages already installed on its machine; a newcomer's `pip install` resolves afresh. This asks pip
what a fresh resolve of `torch==2.13.0 -e ".[test]"` would install (a dry run that ignores what is installed) and
compares the packages whose versions decide whether the tests pass; then checks that the README's "Tested versions"
states the same versions.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

# faker: the open-facts generator draws its values from faker's word lists, so its version decides the episodes
CHECKED = ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "faker")


def fresh_versions(root: Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        command += ["--report", str(report), "torch==2.13.0", "-e", f"{root}[test]"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"pip could not resolve a fresh install of the test command:\n{done.stderr}")
        installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}


def readme_versions(readme: str) -> dict[str, str]:
    """``{package: version}`` as the README's "**Tested versions**" paragraph states them ("torch 2.13.0 (CPU)")."""
    start = readme.index("**Tested versions**")
    paragraph = readme[start : readme.find("\n\n", start)]
    return {name.lower(): version for name, version in re.findall(r"([A-Za-z][\w-]*) (\d+\.\d+(?:\.\d+)?)", paragraph)}


def readme_drift(readme: str, fresh: dict[str, str]) -> list[str]:
    """The packages whose version the README states otherwise than a fresh install gets (and checked ones it omits)."""
    stated = readme_versions(readme)
    drift = [
        f"  {name}: the README says {version}, a fresh install gets {fresh[name]}"
        for name, version in stated.items()
        if name in fresh and fresh[name].split("+")[0] != version  # "2.13.0+cpu" is torch 2.13.0's CPU build
    ]
    drift += [f"  {name}: the README does not state it (a fresh install gets {fresh.get(name)})"
              for name in CHECKED if name not in stated]  # fmt: skip
    return drift


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    fresh = fresh_versions(root)
    drift = []
    for name in CHECKED:
        try:
            here = metadata.version(name)
        except metadata.PackageNotFoundError:
            here = "not installed"
        if fresh.get(name) != here:
            drift.append(f"  {name}: a fresh install gets {fresh.get(name, 'nothing')}, this machine has {here}")
    if drift:
        print("A fresh install of the README's test command would test other versions than this machine:")
        print("\n".join(drift))
        print("Install those versions here and run the tests, or narrow the ranges in setup.cfg.")
        return 1
    print("fresh resolve matches the installed versions: " + ", ".join(f"{n} {fresh[n]}" for n in CHECKED))
    stale = readme_drift((root / "README.md").read_text(encoding="utf-8"), fresh)
    if stale:
        print("README.md's 'Tested versions' does not match a fresh install:")
        print("\n".join(stale))
        return 1
    print("README.md's 'Tested versions' matches the fresh resolve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
