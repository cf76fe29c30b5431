"""What grammar-constrained decoding costs in the engine (CPU): grammar compile time, the per-token cost of a
constrained request's mask (fill, apply, accept) at batch 1 and 32, and the engine's step time with 0, 1, half
or all of the batch constrained, paired in one run.

Set-up: a byte-level BPE trained here on this Python's standard library (`--vocab` tokens, loopcoder's special
tokens, so `<tool_call>` is one token) and a random PLT of the shape `loopcoder bench decode` times (hidden 1024,
14 layers, 2 loops; `--hidden-size`/`--layers` shrink it: the smaller the model, the larger the mask's share).
Constrained requests follow the "tools" schema below (an anyOf of two tool calls, with strings, enums, arrays
and bounded numbers); a random model walks it to the end, so a finished request is replaced by a new one, and a
step that admits one (it prefills) is not timed. Configurations take turns for `--rounds` rounds of `--steps`
steps each (the slow drift of a shared machine hits all alike); reported: per configuration the median step in
wall time and in the process's CPU time, and the ratio of each to its batch's unconstrained step.

    PYTHONPATH=src python3 benchmarks/constrained_decode.py --threads 1 --out benchmarks/results/constrained.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from loopcoder.bench.decode import DecodeBenchSettings, build_model
from loopcoder.inference.constraints import Constraint, GrammarCompiler, apply_masks, mask_logits
from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.serving.tool_calls import HermesToolCallParser, tool_call_grammar

TOOLS = {
    "anyOf": [
        {
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 24},
                        "unit": {"enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 14},
                    },
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "name": {"const": "run_tests"},
                "arguments": {
                    "type": "object",
                    "properties": {
                        "paths": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 4},
                        "timeout": {"type": "number", "minimum": 0, "maximum": 600},
                    },
                    "required": ["paths"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
    ]
}
COMPILE_SCHEMAS = {
    "object, 2 fields": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "2 tools (anyOf)": TOOLS,
    "any JSON object": {"type": "object"},
}


def build_tokenizer(vocab: int, files: int = 1500):
    """loopcoder's byte-level BPE trained on the standard library's sources (a few MB of Python)."""
    from transformers import PreTrainedTokenizerFast

    from loopcoder.data.tokenizer import train_tokenizer

    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))

    def texts():
        for f in paths[:files]:
            try:
                yield f.read_text(errors="ignore")
            except OSError:
                continue

    tok = train_tokenizer(texts(), vocab_size=vocab)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def median_ms(xs: list[float]) -> float:
    return round(1e3 * statistics.median(xs), 4)


class Clock:
    """`with Clock() as c:` then c.wall, c.cpu (s). CPU time is this process's (all its threads: llguidance may
    use its own), less hit by the other processes of a shared machine than wall time."""

    def __enter__(self) -> Clock:
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._t, time.process_time() - self._c


def compile_times(tok, vocab: int) -> dict:
    """Per schema: a cold compile (fresh compiler, tokenizer view built before) up to the first mask, the point
    where a request can sample; and a cached one (what every later request with the same schema pays)."""
    out: dict = {}
    with Clock() as k:
        _ = GrammarCompiler(tok, vocab).lltokenizer
    out["tokenizer view (once per engine)"] = {"wall_ms": round(1e3 * k.wall, 1), "cpu_ms": round(1e3 * k.cpu, 1)}
    for name, schema in COMPILE_SCHEMAS.items():
        cold, warm = [], []
        for _ in range(3):
            c = GrammarCompiler(tok, vocab)
            _ = c.lltokenizer  # built before the clock starts
            mask = np.zeros((vocab + 31) // 32, dtype=np.int32)
            for times in (cold, warm):
                with Clock() as k:
                    c.matcher(Constraint.json_schema(schema), [tok.eos_token_id]).fill(mask)
                times.append(k)
        out[name] = {
            "cold_ms": median_ms([k.wall for k in cold]),
            "cold_cpu_ms": median_ms([k.cpu for k in cold]),
            "cached_ms": median_ms([k.wall for k in warm]),
            "cached_cpu_ms": median_ms([k.cpu for k in warm]),
        }
    return out


def auto_constraint(compiler: GrammarCompiler) -> Constraint:
    """`tool_choice` "auto" with the two tools of TOOLS: free text (without the call marker), then calls."""
    functions = [
        {"name": b["properties"]["name"]["const"], "parameters": b["properties"]["arguments"]} for b in TOOLS["anyOf"]
    ]
    lark = tool_call_grammar(compiler, HermesToolCallParser(), functions, required=False, parallel=True)
    return Constraint.grammar(lark)


def mask_parts(tok, vocab: int, batch: int, kind: str, tokens: int = 400) -> dict:
    """Per-token CPU cost of the mask's parts, over random walks: fill (llguidance), apply (to the logits),
    accept (advance the parser); a finished walk starts again. Batch > 1: rows at different points."""
    c = GrammarCompiler(tok, vocab)
    constraint = Constraint.json_schema(TOOLS) if kind == "json" else auto_constraint(c)
    g = torch.Generator().manual_seed(0)
    matchers = [c.matcher(constraint, [tok.eos_token_id]) for _ in range(batch)]
    fill, apply, accept = [], [], []
    for _ in range(tokens // batch + 8):
        masks = np.zeros((batch, (vocab + 31) // 32), dtype=np.int32)
        with Clock() as k:
            for row, m in enumerate(matchers):
                m.fill(masks[row])
        fill.append(k.cpu)
        logits = torch.randn(batch, vocab, generator=g)
        with Clock() as k:
            apply_masks(logits, list(range(batch)), masks)
        apply.append(k.cpu)
        chosen = logits.argmax(-1).tolist()
        with Clock() as k:
            for row, m in enumerate(matchers):
                if chosen[row] == tok.eos_token_id or m.done:
                    matchers[row] = c.matcher(constraint, [tok.eos_token_id])
                else:
                    m.accept(chosen[row])
        accept.append(k.cpu)
    logits = torch.randn(batch, vocab)
    none = [None] * batch
    t = time.perf_counter()
    for _ in range(1000):
        mask_logits(logits, none)
    free = (time.perf_counter() - t) / 1000
    return {
        "fill_cpu_ms": median_ms(fill),
        "apply_cpu_ms": median_ms(apply),
        "accept_cpu_ms": median_ms(accept),
        "no grammar in the batch (mask_logits) us": round(1e6 * free, 3),
    }


class Runner:
    """An engine kept at `batch` running requests, `constrained` of them with the tools grammar."""

    def __init__(
        self,
        model,
        tok,
        compiler: GrammarCompiler,
        batch: int,
        constrained: int,
        prompt: list[int],
        max_seq_len: int,
        kind: str = "json",
    ) -> None:
        self.engine = Engine(model, tok, max_batch=batch, max_seq_len=max_seq_len)
        self.engine.grammars = compiler  # one compiler for all: compiled once, as in a server
        self.batch, self.constrained, self.prompt = batch, constrained, prompt
        self.free = SamplingParams(max_new_tokens=max_seq_len, temperature=1.0, ignore_eos=True, seed=0)
        self.json = SamplingParams(
            max_new_tokens=max_seq_len,
            temperature=1.0,
            seed=0,
            constraint=Constraint.json_schema(TOOLS) if kind == "json" else auto_constraint(compiler),
        )
        self.reqs: list = []
        self.replaced = 0

    def top_up(self) -> bool:
        self.reqs = [r for r in self.reqs if not r.finished]
        added = False
        while len(self.reqs) < self.batch:
            n_json = sum(r.params.constraint is not None for r in self.reqs)
            params = self.json if n_json < self.constrained else self.free
            self.reqs.append(self.engine.add_request(self.prompt, params))
            self.replaced += 1
            added = True
        return added

    def run(self, steps: int) -> tuple[list[float], list[float]]:
        wall, cpu = [], []
        while len(wall) < steps:
            if self.top_up():
                self.engine.step()  # admits (prefills): not timed
                continue
            t, c = time.perf_counter(), time.process_time()
            self.engine.step()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32768, help="tokens of the BPE trained here")
    ap.add_argument("--files", type=int, default=1500, help="standard-library files it is trained on")
    ap.add_argument("--hidden-size", type=int, default=DecodeBenchSettings.hidden_size)
    ap.add_argument("--layers", type=int, default=DecodeBenchSettings.num_layers)
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per configuration and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON report path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_before": os.getloadavg(),
        "torch": torch.__version__,
        "args": vars(args),
    }
    t = time.perf_counter()
    tok = build_tokenizer(args.vocab, args.files)
    vocab = len(tok)
    report["tokenizer"] = {"vocab": vocab, "train_s": round(time.perf_counter() - t, 1)}
    print(json.dumps(report["tokenizer"]), file=sys.stderr, flush=True)
    report["compile"] = compile_times(tok, vocab)
    print(json.dumps(report["compile"]), file=sys.stderr, flush=True)
    report["mask_parts"] = {
        f"{kind} batch {b}": mask_parts(tok, vocab, b, kind) for kind in ("json", "auto") for b in args.batches
    }
    print(json.dumps(report["mask_parts"]), file=sys.stderr, flush=True)

    s = DecodeBenchSettings(hidden_size=args.hidden_size, num_layers=args.layers, vocab_size=vocab, contexts=(2048,))
    model = build_model(PLTForCausalLM, s.model_config(args.loops), torch.device("cpu"), torch.float32, 0)
    prompt = tok("Call a tool for the weather in Paris: ", add_special_tokens=False)["input_ids"]
    compiler = GrammarCompiler(tok, model.config.vocab_size)
    configs = {}
    for b in args.batches:
        for n in sorted({0, 1, b // 2, b}):
            configs[f"b={b} constrained={n}"] = Runner(model, tok, compiler, b, n, prompt, 256)
        configs[f"b={b} auto-tools={b}"] = Runner(model, tok, compiler, b, b, prompt, 256, kind="auto")
    for r in configs.values():  # warm-up
        r.run(2)
    times = {name: ([], []) for name in configs}
    for rnd in range(args.rounds):
        order = list(configs) if rnd % 2 == 0 else list(reversed(configs))
        for name in order:
            w, c = configs[name].run(args.steps)
            times[name][0].append(statistics.median(w))
            times[name][1].append(statistics.median(c))
    steps: dict = {}
    for name, (w, c) in times.items():
        b = name.split()[0]
        base_w, base_c = times[f"{b} constrained=0"]
        steps[name] = {
            "step_ms": median_ms(w),
            "cpu_ms": median_ms(c),
            # per round: this configuration over its batch's free one, then the median (paired)
            "ratio_wall": round(statistics.median(x / y for x, y in zip(w, base_w)), 4),
            "ratio_cpu": round(statistics.median(x / y for x, y in zip(c, base_c)), 4),
            "ratio_cpu_range": [
                round(min(x / y for x, y in zip(c, base_c)), 4),
                round(max(x / y for x, y in zip(c, base_c)), 4),
            ],
            "requests_started": configs[name].replaced,
        }
    report["steps"] = steps
    report["model"] = {
        "hidden": args.hidden_size,
        "layers": args.layers,
        "loops": args.loops,
        "vocab": vocab,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
    }
    report["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
