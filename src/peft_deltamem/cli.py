"""The ``peft-deltamem`` command line.

Subcommands:

- ``import-reference REFERENCE_DIR OUTPUT_DIR [--base-model ID] [--overwrite]``: convert an adapter
  saved by the authors' reference code into a peft adapter directory (see
  :func:`peft_deltamem.convert_reference_adapter`).

Heavy libraries (torch, transformers) are imported by the subcommand that needs them, after the
arguments are parsed. Each subcommand is an ``add_parser`` call plus a handler taking the parsed
arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _import_reference(args: argparse.Namespace) -> int:
    from .convert import convert_reference_adapter

    try:
        output = convert_reference_adapter(
            args.reference_dir, args.output_dir, base_model_name_or_path=args.base_model, overwrite=args.overwrite
        )
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"peft-deltamem import-reference: error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote the δ-mem adapter to {output}. Load it with `import peft_deltamem` and PeftModel.from_pretrained.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-deltamem", description="δ-mem adapters for peft: tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    importer = commands.add_parser(
        "import-reference",
        help="convert an adapter saved by the authors' reference code into a peft adapter directory",
        description="Convert an adapter saved by the δ-mem authors' reference code (delta_mem_config.json + "
        "delta_mem_adapter.pt) into a peft adapter directory (adapter_config.json, adapter_model.safetensors, "
        "model card) that PeftModel.from_pretrained loads after `import peft_deltamem`.",
    )
    importer.add_argument(
        "reference_dir", metavar="REFERENCE_DIR", help="local directory or Hugging Face Hub id of the reference adapter"
    )
    importer.add_argument("output_dir", metavar="OUTPUT_DIR", help="directory to write the peft adapter into")
    importer.add_argument(
        "--base-model",
        metavar="ID",
        default=None,
        help="base model id recorded in adapter_config.json (e.g. Qwen/Qwen3-4B-Instruct-2507)",
    )
    importer.add_argument(
        "--overwrite", action="store_true", help="replace the adapter files of an existing, non-empty OUTPUT_DIR"
    )
    importer.set_defaults(handler=_import_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
