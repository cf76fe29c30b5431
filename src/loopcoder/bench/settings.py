"""The benchmarks' settings. Apart from the benchmarks themselves (which import torch), so that
`loopcoder bench ... --help` shows these defaults, the command line's own, without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loopcoder.model.shape import ModelShape, mlp_width

if TYPE_CHECKING:
    from loopcoder.model.config import PLTConfig


def _shape(s: DecodeBenchSettings | TrainBenchSettings, loops: int, positions: int, arch: str = "plt") -> ModelShape:
    """The model a benchmark builds from its settings' shape fields."""
    return ModelShape(
        loops=loops,
        hidden_size=s.hidden_size,
        layers=s.num_layers,
        heads=s.num_heads,
        kv_heads=s.num_kv_heads,
        head_dim=s.head_dim,
        intermediate_size=s.intermediate_size,
        vocab_size=s.vocab_size,
        window=s.window,
        architecture=arch,
        max_position_embeddings=positions,
    )


@dataclass
class DecodeBenchSettings:
    # The released 7B's proportions scaled to hidden 1024: 14 layers, MLP 5.4x, head_dim 128, 4:1 GQA,
    # vocabulary 15x hidden (so lm_head is a realistic share of the weights read per step).
    hidden_size: int = 1024
    num_layers: int = 14
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 128
    intermediate_size: int = 5504
    vocab_size: int = 15360
    window: int = 64
    loops: tuple[int, ...] = (2, 3, 4)
    batches: tuple[int, ...] = (1, 32)
    contexts: tuple[int, ...] = (512, 2048)
    steps: int = 4  # timed steps per configuration and round
    rounds: int = 5  # the configurations compared take turns this many times (drift hits all alike)
    warmup: int = 2
    device: str = "cpu"
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 on GPU (the CLI's default is this one)
    include_transformers: bool = True
    cuda_graphs: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def steps_per_engine(self) -> int:
        """Decode steps one engine takes: two modes (single-pass, sequential) share an engine and its cache."""
        return self.warmup + 2 * (self.rounds * self.steps + self.warmup) + 2

    def shape(self, loops: int, arch: str = "plt") -> ModelShape:
        return _shape(self, loops, max(self.contexts) + self.steps_per_engine(), arch)

    def model_config(self, loops: int, arch: str = "plt") -> PLTConfig:
        return self.shape(loops, arch).plt_config()


@dataclass
class ServeBenchSettings:
    model: str | None = None  # None: build a random model (below) with a tokenizer, in a temporary directory
    concurrency: int = 32
    duration: float = 30.0
    warmup: float = 5.0
    max_tokens: int = 64  # per request; end-of-text is ignored, so every request generates exactly this
    max_batch: int = 32
    stream: bool = True
    device: str = "cpu"
    dtype: str = "auto"
    server_threads: int | None = None  # the server's --threads (None: the server's default)
    seed: int = 0
    # the built model (when no --model): `loopcoder init` defaults, a 1024-token BPE vocabulary
    hidden_size: int = 256
    layers: int = 4
    loops: int = 2
    startup_timeout: float = 300.0
    # --workload agentic (bench/agentic.py): agents' multi-turn conversations, with prefix caching and without
    workload: str = "load"  # "load": concurrent clients (bench/serve.py) | "agentic"
    url: str | None = None  # an already running server (agentic: measured alone, no pairing)
    agents: int = 3
    turns: int = 4
    system_chars: int = 4000  # the shared system prompt
    tool_chars: int = 600  # each turn's tool result
    rounds: int = 2


@dataclass
class TrainBenchSettings:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int | None = None  # None: `config.mlp_width(hidden_size)`, training's default
    vocab_size: int = 4096
    window: int = 64
    batch: int = 8
    seq_len: int = 256
    loops: tuple[int, ...] = (1, 2, 3)
    steps: int = 5
    warmup: int = 2
    rounds: int = 3
    device: str = "cpu"
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 autocast on GPU
    include_transformers: bool = True
    activation_checkpointing: bool = False
    attention: str = "sdpa"  # PLT's training attention: sdpa | flex_attention (CUDA); transformers' stays sdpa
    seed: int = 0

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = mlp_width(self.hidden_size)

    def model_config(self, loops: int) -> PLTConfig:
        return _shape(self, loops, max(self.seq_len, 128)).plt_config(pad_token_id=0)
