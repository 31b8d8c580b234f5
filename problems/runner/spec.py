"""What identifies a run: :class:`RunSpec`, its file key and its evaluation points."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["RunSpec"]


@dataclass(frozen=True)
class RunSpec:
    """One training run: a problem, a method spec with options, and the settings of the run."""

    problem: str
    method: str  # a method spec, e.g. "penalty:rho=1e4"
    lr: float
    batch: str = "full"  # "full" or "mini"
    seed: int = 0  # batch seed (mini-batch runs)
    iterations: int = 1000
    size: str = "paper"
    device: str = "cpu"
    dtype: str = "float32"
    model_seed: int = 0
    eval_every: int | None = None  # default: iterations // 100

    def key(self) -> str:
        method = re.sub(r"[^A-Za-z0-9.=_-]+", "_", self.method.replace(":", "_"))
        return f"{method}__lr{self.lr:g}__{self.batch}__s{self.seed}__it{self.iterations}__{self.size}__{self.dtype}"

    def evaluation_points(self) -> list[int]:
        every = self.eval_every or max(1, self.iterations // 100)
        return sorted({*range(0, self.iterations, every), self.iterations})
