"""xgrammar against llguidance on this project's tokenizers (CPU): the measurements behind the choice of
grammar library (docs/serving.md, "Constrained decoding").

Needs both libraries (`pip install xgrammar llguidance`; loopcoder itself depends on llguidance only) and
tokenizer directories (`loopcoder data build` trains them; any byte-level BPE saved by
`loopcoder.data.tokenizer.save_tokenizer` works). Per tokenizer it reports:
- the one-off tokenizer set-up;
- compile time per JSON schema (a fresh compiler per schema, so nothing is cached; for llguidance, whose
  compilation is lazy, the matcher's construction plus its first mask, the point where a request could
  sample its first token);
- the mask time per token at batch 1: one matcher walking a document token by token (random logits, masked,
  argmax: a random model's walk), `fill` (the bitmask) and `accept` (the token) timed separately;
- batch 32: 32 matchers at different points of their walks, the (32, vocab/32) bitmask filled one row at a
  time and with the library's batch call (its own threads).

Times are CPU time (`clock` below). Tokenizers like the benchmark's own: `constrained_decode.build_tokenizer`.

    PYTHONPATH=src python3 benchmarks/grammar_libraries.py --tokenizers DIR4096 DIR76800 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "status": {"enum": ["open", "closed", "merged"]},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
            "author": {
                "type": "object",
                "properties": {"login": {"type": "string", "maxLength": 16}, "admin": {"type": "boolean"}},
                "required": ["login"],
                "additionalProperties": False,
            },
            "files": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string", "maxLength": 24},
                        "lines": {"type": "integer", "minimum": 1},
                    },
                    "required": ["path", "lines"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["id", "status", "author"],
        "additionalProperties": False,
    },
    "tools": {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": "get_weather"},
                    "arguments": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
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
                            "paths": {"type": "array", "items": {"type": "string"}},
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
    },
}
# CPU time of this process (all its threads): on a shared, loaded machine far steadier than wall time. A library's
# batch call with several threads is counted as the work of all of them, not as its latency.
clock = time.process_time
MAX_WALK = 96  # tokens per walk (a random model can stay inside a string for long)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)

    def compile(self, schema: dict):
        c = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return c.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, mask: torch.Tensor, row: int) -> None:
        m.fill_next_token_bitmask(mask, row)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)

    def done(self, m) -> bool:
        return m.is_terminated()

    def batch_filler(self, threads: int):
        batch = self.xgr.BatchGrammarMatcher(max_threads=threads)
        return lambda ms, mask: batch.batch_fill_next_token_bitmask(ms, mask)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = self.llg.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        mask = torch.zeros(1, (self.tok.vocab_size + 31) // 32, dtype=torch.int32)
        self.fill(m, mask, 0)  # lazy: the first mask is part of getting ready
        return grammar

    def matcher(self, compiled):
        return self.llg.LLMatcher(self.tok, compiled)

    def fill(self, m, mask: torch.Tensor, row: int) -> None:
        self.llg.torch.fill_next_token_bitmask(m, mask, row)

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)

    def done(self, m) -> bool:
        return m.is_stopped()

    def batch_filler(self, threads: int):
        executor = self.llg.LLExecutor(num_threads=threads)
        return lambda ms, mask: self.llg.torch.fill_next_token_bitmask_par(
            executor, list(zip(ms, range(len(ms)))), mask
        )


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    bits = (mask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    logits.masked_fill_(bits.view(mask.shape[0], -1)[:, : logits.shape[1]] == 0, float("-inf"))


def walk(lib, compiled, vocab: int, seed: int, stop_at: int = MAX_WALK):
    """A matcher advanced `stop_at` random-but-allowed tokens (or to the end); (matcher, fill s, accept s)."""
    g = torch.Generator().manual_seed(seed)
    m = lib.matcher(compiled)
    mask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    fills, accepts = [], []
    for _ in range(stop_at):
        if lib.done(m):
            break
        t0 = clock()
        lib.fill(m, mask, 0)
        t1 = clock()
        logits = torch.randn(1, vocab, generator=g)
        apply_mask(logits, mask)
        token = int(logits.argmax())
        t2 = clock()
        assert lib.accept(m, token), (lib.name, token)
        accepts.append(clock() - t2)
        fills.append(t1 - t0)
    return m, fills, accepts


def bench(lib, vocab: int, seeds: int, threads: int) -> dict:
    out: dict = {}
    for name, schema in SCHEMAS.items():
        compile_s = []
        for _ in range(3):
            t = clock()
            compiled = lib.compile(schema)
            compile_s.append(clock() - t)
        fills, accepts = [], []
        for s in range(seeds):
            _, f, a = walk(lib, compiled, vocab, s)
            fills += f
            accepts += a
        out[name] = {
            "compile_ms": 1e3 * statistics.median(compile_s),
            "tokens": len(fills),
            "fill_us": 1e6 * statistics.median(fills),
            "fill_p99_us": 1e6 * sorted(fills)[int(0.99 * len(fills))],
            "accept_us": 1e6 * statistics.median(accepts),
        }
    # batch 32: matchers at different depths of different schemas
    compiled = {n: lib.compile(s) for n, s in SCHEMAS.items()}
    names = list(SCHEMAS)
    ms = [walk(lib, compiled[names[i % 3]], vocab, 100 + i, stop_at=1 + i % 12)[0] for i in range(32)]
    ms = [m for m in ms if not lib.done(m)]
    mask = torch.zeros(len(ms), (vocab + 31) // 32, dtype=torch.int32)
    seq, par = [], []
    filler = lib.batch_filler(threads)
    for _ in range(20):
        t = clock()
        for i, m in enumerate(ms):
            lib.fill(m, mask, i)
        seq.append(clock() - t)
        t = clock()
        filler(ms, mask)
        par.append(clock() - t)
    logits = torch.randn(len(ms), vocab)
    apply_s = []
    for _ in range(20):
        t = clock()
        apply_mask(logits, mask)
        apply_s.append(clock() - t)
    out["batch"] = {
        "rows": len(ms),
        "fill_rows_one_by_one_ms": 1e3 * statistics.median(seq),
        f"fill_batch_call_{threads}_threads_ms": 1e3 * statistics.median(par),
        "apply_ms": 1e3 * statistics.median(apply_s),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizers", nargs="+", required=True)
    ap.add_argument("--libraries", nargs="+", default=["llguidance", "xgrammar"])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    libs = {"xgrammar": XGrammar, "llguidance": LLGuidance}
    report: dict = {"threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()}
    for path in args.tokenizers:
        tok = AutoTokenizer.from_pretrained(path)
        vocab = len(tok)
        for name in args.libraries:
            t = clock()
            lib = libs[name](tok, vocab)
            setup = clock() - t
            report[f"{name} vocab={vocab}"] = {
                "tokenizer_setup_ms": 1e3 * setup,
                **bench(lib, vocab, args.seeds, args.threads),
            }
            print(json.dumps({f"{name} vocab={vocab}": report[f"{name} vocab={vocab}"]}, indent=1), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
