"""`volunteer chat`: stream answers from a model, one prompt or an interactive session."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from volunteer.errors import SettingsError
from volunteer.model_cache.smollm2 import DEFAULT_MODEL
from volunteer.paths import Paths
from volunteer.settings.spec import WEIGHT_FORMATS
from volunteer.transport.protocol import printable

if TYPE_CHECKING:
    from volunteer.chat.conversation import Conversation
    from volunteer.models.sampling import SamplingParams
    from volunteer.models.weight_format import WeightFormat


class Chat(Protocol):
    """What answers a conversation: local, through the daemon, or through a swarm."""

    def stream_reply(
        self, conversation: Conversation, *, max_new_tokens: int, sampling: SamplingParams
    ) -> Iterator[str]: ...


_HELP_INTERACTIVE = "Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) quits."


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model",
        description="Stream an answer to PROMPT, or chat interactively when no prompt is given. "
        "By default the local daemon (`volunteer start`) answers through the swarm.",
    )
    parser.add_argument("prompt", nargs="?", help="one message; omit for an interactive chat")
    parser.add_argument(
        "--local",
        action="store_true",
        help="run the whole model in this process (the reference the swarm must match)",
    )
    parser.add_argument(
        "--swarm",
        action="append",
        metavar="MULTIADDR",
        help="chat through the swarm this peer belongs to, without a local daemon (repeatable)",
    )
    parser.add_argument(
        "--model",
        help=f"model name (default: the daemon's; {DEFAULT_MODEL} with --local or --swarm)",
    )
    parser.add_argument(
        "--adapter",
        metavar="NAME",
        help="answer with a fine-tuned adapter (`volunteer adapters list`)",
    )
    parser.add_argument("--system", help="system prompt (default: the model's own)")
    parser.add_argument("--max-new-tokens", type=int, default=512, metavar="N")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="0 (the default) decodes greedily, which suits small models best; "
        "0.7 gives more varied answers",
    )
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 keeps all tokens")
    parser.add_argument("--top-p", type=float, default=0.9, metavar="P")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R")
    parser.add_argument("--seed", type=int, metavar="S", help="seed for reproducible sampling")
    parser.add_argument(
        "--verify",
        choices=("off", "sample", "all"),
        help="check the servers' steps by recomputing them elsewhere: off, sample (a share, "
        "more for newcomers) or all (every step); default: the daemon's setting, or sample",
    )
    parser.add_argument(
        "--dtype",
        choices=WEIGHT_FORMATS,
        help="form of the weights with --local, and of the servers' with --swarm: auto (the "
        "fastest here), fp32, bf16, int8 or q4; default: the `dtype` setting",
    )
    parser.add_argument(
        "--kv-cache",
        choices=("float", "q4"),
        default="float",
        help="with --local: hold the attention cache in 4 bits (q4, about 1/6 of float32's "
        "memory, a little less accurate and slower here) or as floats (the default)",
    )
    parser.set_defaults(handler=run)


def _weight_format(args: argparse.Namespace, paths: Paths) -> WeightFormat:
    """--dtype, else the `dtype` setting (config file, VOLUNTEER_DTYPE), resolved."""
    from volunteer.machine.weight_choice import resolve_format
    from volunteer.settings import Settings

    flags = {"dtype": args.dtype}
    return resolve_format(Settings.build(paths=paths, env=os.environ, flags=flags).dtype)


def run(args: argparse.Namespace, paths: Paths) -> int:
    # torch loads here, not at CLI start-up, so other commands and --help stay fast.
    from volunteer.chat.conversation import Conversation, user_sampling

    if args.local and args.swarm:
        raise SettingsError("--local and --swarm exclude each other; give one of them")
    if args.local and args.verify:
        raise SettingsError("--verify checks swarm servers; --local runs every block here")
    if args.dtype and not (args.local or args.swarm):
        raise SettingsError("--dtype goes with --local or --swarm; the daemon has its own")
    if args.kv_cache != "float" and not args.local:
        # Servers keep float caches: a client's checks recompute their steps with one.
        raise SettingsError("--kv-cache goes with --local (servers keep float caches)")
    if args.max_new_tokens <= 0:
        raise SettingsError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    sampling = user_sampling(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    conversation = Conversation(system_prompt=args.system)
    with _open_chat(args, paths) as chat:
        if args.prompt is not None:
            _answer(chat, conversation, args.prompt, args, sampling, sys.stdout)
            return 0
        return _interactive(chat, conversation, args, sampling)


@contextlib.contextmanager
def _open_chat(args: argparse.Namespace, paths: Paths) -> Iterator[Chat]:
    """The model in this process (--local), a swarm joined from here (--swarm), or the
    daemon's client (the default)."""
    if args.swarm:
        from volunteer.machine.cpu_sharing import sleep_idle_threads

        sleep_idle_threads()  # the blocks run on other processes, likely on these cores
    if args.adapter and (args.local or args.swarm):
        with _adapted_chat(args, paths) as chat:
            yield chat
    elif args.local:
        from volunteer.chat.local import LocalChat
        from volunteer.model_cache.store import ModelStore  # (tqdm and hashing: not for `tui`)

        folder = ModelStore(paths.models_dir).resolve(args.model or DEFAULT_MODEL)
        chat = LocalChat.load(folder, fmt=_weight_format(args, paths))
        chat.kv_format = args.kv_cache
        yield chat
    elif args.swarm:
        from volunteer.machine.lean_imports import import_hivemind

        import_hivemind()
        from volunteer.chat.via_swarm import SwarmChat
        from volunteer.client.swarm_connection import SwarmConnection
        from volunteer.daemon.local_checks import local_blocks
        from volunteer.model_cache.served_model import open_model
        from volunteer.model_cache.weights_hash import weights_hash

        model = open_model(args.model or DEFAULT_MODEL, paths.models_dir)
        fmt = _weight_format(args, paths)
        with SwarmConnection(args.swarm) as connection:
            client = connection.client(
                model=model.swarm_name,
                num_blocks=model.config.num_layers,
                weights_hash=weights_hash(model.folder),  # only servers of the same weights
                weights_format=fmt.label,  # held as this process checks them
                config=model.config,
                verify=args.verify or "sample",
                local_blocks=local_blocks(model, fmt),  # this process decides mismatches
            )
            chat = SwarmChat.load(
                model.folder, model.config, client=client, loop=connection.loop, fmt=fmt
            )
            chat.notify = _tell
            yield chat
    else:
        from volunteer.chat.via_daemon import DaemonChat

        yield DaemonChat(
            paths, model=args.model, verify=args.verify, notify=_tell, adapter=args.adapter
        )


@contextlib.contextmanager
def _adapted_chat(args: argparse.Namespace, paths: Paths) -> Iterator[Chat]:
    """A chat with a stored adapter, the model here (--local) or in a swarm (--swarm)."""
    from volunteer.commands.finetune_model import open_here
    from volunteer.finetune.adapted_chat import load_adapter, local_chat, swarm_chat
    from volunteer.finetune.store import AdapterStore

    with open_here(args.model or DEFAULT_MODEL, paths, swarm=args.swarm) as (model, blocks):
        store = AdapterStore.of(paths)
        loaded = load_adapter(store, args.adapter, config=model.config, model=model.name)
        if args.local:
            yield local_chat(model.ends, blocks.span, model.tokenizer, loaded)
        else:
            yield swarm_chat(model.ends, blocks, model.tokenizer, model.config, loaded)


def _tell(notice: str) -> None:
    """Shows a notice on a reply under way (e.g. the blocks it waits for) on stderr,
    apart from the reply's text."""
    print(f"volunteer: {printable(notice, max_chars=200)}", file=sys.stderr, flush=True)


def _answer(
    chat: Chat,
    conversation: Conversation,
    prompt: str,
    args: argparse.Namespace,
    sampling: SamplingParams,
    out: TextIO,
) -> None:
    conversation.messages.append({"role": "user", "content": prompt})
    pieces = []
    try:
        for piece in chat.stream_reply(
            conversation, max_new_tokens=args.max_new_tokens, sampling=sampling
        ):
            pieces.append(piece)
            # A model's weights came from its publisher: its text must not drive the
            # terminal (escape sequences, bidirectional overrides).
            out.write(printable(piece, keep_lines=True, max_chars=len(piece)))
            out.flush()
    finally:
        # An interrupted reply still joins the conversation, as far as it got.
        conversation.messages.append({"role": "assistant", "content": "".join(pieces)})
        out.write("\n")
        out.flush()


def _interactive(
    chat: Chat, conversation: Conversation, args: argparse.Namespace, sampling: SamplingParams
) -> int:
    print(_HELP_INTERACTIVE, file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            conversation.messages.clear()
            print("(new conversation)", file=sys.stderr)
            continue
        if not text:
            continue
        try:
            _answer(chat, conversation, text, args, sampling, sys.stdout)
        except KeyboardInterrupt:
            print("(stopped)", file=sys.stderr)
