"""What the scripts share: a parser built from the module docstring, where a benchmark writes its results
(a git-ignored folder by default, the committed ``docs/`` only when asked), and the repository root on
``sys.path`` (for ``benchmarks/``).

Standard library only: every script parses its arguments before importing torch, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# The measurement code (``benchmarks/``, beside ``src/``) is not installed with the package: the repository root
# goes on the path so that every script imports it, whatever the working directory.
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first paragraph and whose epilog is the rest, as written."""
    head, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_options(parser: argparse.ArgumentParser, name: str, files: str) -> None:
    """``--out DIR`` (default ``outputs/<name>``, git-ignored) and ``--write-docs`` (replace the committed docs)."""
    default = ROOT / "outputs" / name
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"directory for {files} (default: {default.relative_to(ROOT)}/, git-ignored)",
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f"write into docs/ instead, replacing the committed {files}",
    )
    parser.set_defaults(_default_out=default)


def output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The directory chosen by ``--out`` / ``--write-docs`` (both at once is an error)."""
    if args.write_docs and args.out is not None:
        parser.error("--out and --write-docs name two different places; give one of them")
    return DOCS if args.write_docs else (args.out or args._default_out)
