"""Fail when a fresh install of the README's test command would test other versions than this machine has.

CI reuses the packages already installed on its machine; a newcomer's `pip install` resolves afresh. This asks pip
what a fresh resolve of `torch==2.13.0 -e ".[test]"` would install (a dry run that ignores what is installed) and
compares the packages whose versions decide whether the tests pass.
"""

from __future__ import annotations

import json
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


def main() -> int:
    fresh = fresh_versions(Path(__file__).resolve().parents[1])
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
