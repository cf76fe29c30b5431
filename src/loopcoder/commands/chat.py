"""`loopcoder chat`: a multi-turn conversation in the terminal, streamed.

Each turn renders the whole conversation (the `--system` prompt, every earlier turn, the new message)
with the model's chat template, as `generate --chat` and the server do (`loading.chat_prompt_ids`), and
prints the reply as it is decoded. A reply ends with its turn (`<|im_end|>` or end-of-text) or at
`--max-new-tokens`. The engine keeps finished turns' K/V blocks (prefix caching), so a turn prefills
little more than its new text.

Lines that start with `/` are commands: `/reset` forgets the conversation (not the system prompt),
`/exit` ends it, as do end of input (Ctrl-D) and Ctrl-C at the prompt; Ctrl-C during a reply stops that
reply and drops its turn. When stdin is not a terminal, each line is one message and stdout carries the
replies only, one line each, so a chat can be scripted:

    printf 'Write a function that adds two numbers.\\nNow add type hints.\\n' | loopcoder chat --model DIR
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopcoder.commands.options import (
    add_model_arguments,
    add_runtime_arguments,
    add_sampling_arguments,
    add_tokenizer_check_argument,
    sampling_params,
)
from loopcoder.utils.errors import LoopcoderError

COMMANDS_HELP = "/reset forgets the conversation, /exit ends it (or Ctrl-D)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message that starts the conversation")
    add_sampling_arguments(p, max_new_tokens=512)
    p.add_argument(
        "--show-prompt",
        action="store_true",
        help="before each reply, print the rendered prompt (the whole conversation so far) on stderr",
    )
    add_runtime_arguments(p)
    add_tokenizer_check_argument(p)


@dataclass
class Conversation:
    """The turns so far, as chat-template messages; the system message survives /reset."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self, user: str) -> list[dict[str, str]]:
        """The messages of the next prompt: everything so far and the new user message."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": user}]

    def add(self, user: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.turns.clear()


def read_lines(interactive: bool) -> Iterator[str]:
    """The user's messages: typed at a `>>> ` prompt (with line editing) on a terminal, else stdin's lines."""
    if not interactive:
        yield from sys.stdin
        return
    import readline  # noqa: F401  (line editing and history for input(); only on a terminal)

    while True:
        try:
            yield input(">>> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: the end of the chat
            print(file=sys.stderr)
            return


def run(args: argparse.Namespace) -> int:
    # here, not at the top: they import torch, which `loopcoder chat --help` does not need
    from loopcoder.inference.engine import Engine
    from loopcoder.model.loading import chat_prompt_ids, chat_stop_ids, load_for_inference
    from loopcoder.training.checkpoints import resolve_model_dir
    from loopcoder.utils.runtime import apply_threads

    params = sampling_params(args)
    model_dir = resolve_model_dir(args.model)
    threads = apply_threads(args.threads)
    model, tok = load_for_inference(
        str(model_dir), args.tokenizer, args.device, args.dtype, args.allow_tokenizer_mismatch
    )
    chat_prompt_ids(tok, Conversation().messages("hello"))  # no chat template: one line, before the first turn
    params.stop_token_ids = chat_stop_ids(model.config.eos_token_id, tok)  # a reply ends with its turn

    def new_engine() -> Any:
        return Engine(model, tok, max_batch=1, mode=args.mode)

    def note(text: str) -> None:
        print(f"[{text}]", file=sys.stderr, flush=True)

    def show(event: Any) -> None:
        if event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()

    interactive = sys.stdin.isatty()
    if interactive:
        name = Path(args.model).resolve().name
        note(f"{name}: R={model.config.plt_num_loops}, mode={args.mode}, threads={threads}; {COMMANDS_HELP}")
    engine = new_engine()
    conversation = Conversation(args.system)
    for line in read_lines(interactive):
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0]
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                conversation.reset()
                note("conversation reset")
            else:
                note(f"unknown command {command}; {COMMANDS_HELP}")
            continue
        try:
            ids = chat_prompt_ids(tok, conversation.messages(text))
            if args.show_prompt:
                note(f"prompt: {len(ids)} tokens")
                print(tok.decode(ids), file=sys.stderr, flush=True)
            reply = engine.generate([ids], params, on_event=show)[0]
        except LoopcoderError as e:  # the conversation outgrew the model's context, say: the chat goes on
            note(f"error: {e}; /reset starts over")
            continue
        except KeyboardInterrupt:
            print(flush=True)
            note("reply stopped; this turn is forgotten")
            engine = new_engine()  # the interrupted step may have left the engine half-way
            continue
        print(flush=True)
        if reply.error is not None:
            note(f"error: {reply.error}; this turn is forgotten")
            continue
        conversation.add(text, reply.text)
    return 0
