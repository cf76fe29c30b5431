"""The agent's settings: its protocol and budgets (light: `loopcoder swe --help` reads the defaults without
importing the engine)."""

from __future__ import annotations

from dataclasses import dataclass

from loopcoder.utils.errors import LoopcoderError

PROTOCOLS = ("tool", "text")


@dataclass
class AgentConfig:
    protocol: str = "tool"
    max_turns: int = 30  # model calls
    max_tokens: int = 16_384  # tokens generated over the episode
    max_seconds: float = 900.0  # wall time of the episode
    max_new_tokens: int = 512  # per reply
    command_timeout: float = 60.0
    max_format_errors: int = 3  # in a row
    seed: int = 0

    def check(self) -> AgentConfig:
        if self.protocol not in PROTOCOLS:
            raise LoopcoderError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        for name in ("max_turns", "max_tokens", "max_new_tokens", "max_format_errors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LoopcoderError(f"{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        for name in ("max_seconds", "command_timeout"):
            if not getattr(self, name) > 0:
                raise LoopcoderError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)!r}")
        return self
