"""Options several commands share: `--threads`, integer lists, and the one table of model and training
flags (`--loops 2` is `model.loops=2`). Importing this module imports no torch, so that `--help` is fast.

`CONFIG_FLAGS` is the only place a flag is mapped onto a config key: `add_config_flags` puts a chosen
set of them on a command's parser, `config_overrides` turns what was given back into `{key: value}`
for `training.config.load_config`. `key=value` overrides stay for every other key.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass
from typing import Any

from loopcoder.model.identity import OVERRIDE_FLAG
from loopcoder.training.config import SECTIONS, TrainConfig
from loopcoder.utils.errors import LoopcoderError


@dataclass(frozen=True)
class ConfigFlag:
    flag: str  # "--loops"
    key: str  # "model.loops"
    metavar: str
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


CONFIG_FLAGS: dict[str, ConfigFlag] = {
    f.flag: f
    for f in (
        # the model's shape (pretraining and init; SFT takes the shape of its --init checkpoint)
        ConfigFlag("--loops", "model.loops", "R", "loop count R, plt_num_loops (1: the non-looped baseline)"),
        ConfigFlag("--hidden-size", "model.hidden_size", "N", "hidden size"),
        ConfigFlag("--layers", "model.layers", "N", "decoder layers (each runs R times)"),
        ConfigFlag("--heads", "model.heads", "N", "attention heads"),
        ConfigFlag("--kv-heads", "model.kv_heads", "N", "key/value heads (grouped-query attention)"),
        ConfigFlag("--intermediate-size", "model.intermediate_size", "N", "MLP width (8/3 x hidden when unset)"),
        ConfigFlag("--window", "model.window", "W", "G-SWA's local window, plt_window_size[0]"),
        ConfigFlag("--max-positions", "model.max_position_embeddings", "N", "longest context"),
        ConfigFlag(
            "--architecture", "model.architecture", "ARCH", "plt, or the vanilla looped transformer", ("plt", "vanilla")
        ),
        # training
        ConfigFlag("--data", "data.dir", "DIR", "a data directory from `loopcoder data build`"),
        ConfigFlag("--seq-len", "data.seq_len", "N", "tokens per training sequence (unset: the data's)"),
        ConfigFlag("--steps", "train.steps", "N", "optimizer steps"),
        ConfigFlag("--batch-size", "train.global_batch_size", "N", "sequences per optimizer step, all processes"),
        ConfigFlag("--lr", "optim.lr", "LR", "peak learning rate"),
        ConfigFlag("--device", "train.device", "DEV", "auto, cpu, cuda or cuda:N"),
        ConfigFlag("--seed", "seed", "N", "model initialisation and data order"),
        ConfigFlag("--out", "out", "DIR", "the run directory: config, metrics, checkpoints"),
    )
}
MODEL_FLAGS = tuple(f for f, c in CONFIG_FLAGS.items() if c.key.startswith("model."))
TRAINING_FLAGS = tuple(f for f, c in CONFIG_FLAGS.items() if not c.key.startswith("model."))


def _field_type(key: str) -> Any:
    """The Python type of a config key (int for `int | None`), which the flag's value is parsed as."""
    section, _, name = key.rpartition(".")
    tp = typing.get_type_hints(SECTIONS[section] if section else TrainConfig)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_config_flags(
    parser: argparse.ArgumentParser | Any, flags: tuple[str, ...], defaults: dict[str, Any] | None = None
) -> None:
    """Put `flags` (names in `CONFIG_FLAGS`) on `parser`. Without `defaults`, a flag left out keeps the
    config's value (the help says which key it sets); with them (init, which has no config), each
    flag's default is `defaults[dest]`."""
    if defaults is None:
        group = parser.add_argument_group(
            "config options",
            "Each flag sets the config key in brackets (KEY=VALUE sets the others). A flag left out keeps "
            "the --config's value; without --config, the default shown.",
        )
    else:
        group = parser.add_argument_group("model shape")
    base = TrainConfig().to_dict()
    for name in flags:
        f = CONFIG_FLAGS[name]
        if defaults is None:
            section, _, key = f.key.rpartition(".")
            plain = (base[section] if section else base)[key]
            help_text = f"{f.help} [{f.key}; default: the config's" + ("]" if plain is None else f", else {plain}]")
            default = None
        else:
            help_text, default = f.help, defaults[f.dest]
        group.add_argument(
            f.flag, type=_field_type(f.key), metavar=f.metavar, choices=f.choices, default=default, help=help_text
        )


def config_overrides(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """{key: value} of the config flags given on the command line; a key also given as `key=value`
    in `overrides` is an error (two values for one setting)."""
    out = {f.key: getattr(args, f.dest) for f in CONFIG_FLAGS.values() if getattr(args, f.dest, None) is not None}
    given = {o.partition("=")[0].strip() for o in overrides}
    for flag in CONFIG_FLAGS.values():
        if flag.key in out and flag.key in given:
            raise LoopcoderError(f"{flag.flag} and {flag.key}=... both given: give one of them")
    return out


def add_threads_argument(parser: argparse.ArgumentParser | Any) -> None:
    """The `--threads N` option of every command that computes (applied with `runtime.apply_threads`)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: $OMP_NUM_THREADS, else the cores the load average "
        "shows free, at least 1; see docs/benchmarks.md)",
    )


def add_tokenizer_check_argument(parser: argparse.ArgumentParser | Any) -> None:
    """`--allow-tokenizer-mismatch`, the override of the tokenizer fingerprint check (`loading.check_tokenizer`)."""
    parser.add_argument(
        OVERRIDE_FLAG,
        action="store_true",
        help="use a tokenizer other than the one the model was made with (its ids mean other tokens)",
    )


def int_list(text: str) -> tuple[int, ...]:
    """argparse type for integer lists: `1,2,3`, or a range `1-6` (both ends included)."""
    try:
        if "-" in text and "," not in text:
            a, b = (int(x) for x in text.split("-"))
            return tuple(range(a, b + 1))
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,3 or 1-6, got {text!r}") from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model DIR` and `--tokenizer DIR` of the commands that decode with a model."""
    parser.add_argument(
        "--model",
        required=True,
        help="model directory (released LoopCoder-V2 layout) or a run directory (its newest checkpoint)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """How `generate` and `chat` sample (`sampling_params` reads them back)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens generated at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this probability")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one each time)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace, **more: Any) -> Any:
    """The validated `SamplingParams` of `add_sampling_arguments`'s flags (and `more` fields)."""
    from loopcoder.inference.sampling import SamplingParams  # imports torch: only when a command runs

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        **more,
    ).validate()


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """`--mode`, `--device`, `--dtype` and `--threads` of the commands that decode with a model."""
    parser.add_argument(
        "--mode",
        choices=["parallel", "sequential"],
        default="parallel",
        help="parallel: all loops in one pass per token (PLT); sequential: one pass per loop",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on GPU; float32, bfloat16, float16")
    add_threads_argument(parser)
