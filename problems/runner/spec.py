"""What identifies a run: :class:`RunSpec`, its file key, its validation and its evaluation points.

The key names the run's files (``<results>/<problem>/<key>.json``): a readable prefix (method, learning rate,
batch mode, seed, budget, size, dtype) followed by the first 16 hex digits of the SHA-256 of *every* field of
the spec, so two specs that differ in anything that changes a result (the model seed, the device, the
evaluation interval, the thread count, ...) never share a file, and equal specs always do. Results written
under the keys of the first release (the readable prefix alone) are found by :meth:`RunSpec.legacy_key` and
used only when their recorded config equals the spec (:func:`problems.runner.loop.run`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass

__all__ = ["RunSpec"]

KEY_VERSION = 2


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
    threads: int | None = 1
    """torch's intra-op threads during the run (``None``: leave torch's setting). The problems are small: on a
    CPU extra threads mostly spin (one measured 4.6x faster than two on the spring), and results differ in the
    last bits with the thread count, so it is part of the run's identity."""
    nproc: int = 1
    """Processes sharing each mini-batch (:mod:`problems.runner.parallel`). Like the thread count it changes the
    last bits of the results, so it is part of the run's identity; the key leaves it out when it is 1, so that
    one-process runs keep the keys they had."""

    def _readable(self) -> str:
        method = re.sub(r"[^A-Za-z0-9.=_-]+", "_", self.method.replace(":", "_"))
        return f"{method}__lr{self.lr:g}__{self.batch}__s{self.seed}__it{self.iterations}__{self.size}__{self.dtype}"

    def key(self) -> str:
        """The file name of this run's results (see the module docstring)."""
        fields = asdict(self)
        if self.nproc == 1:
            del fields["nproc"]
        blob = json.dumps({"key_version": KEY_VERSION, **fields}, sort_keys=True)
        return f"{self._readable()}__{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def legacy_key(self) -> str:
        """The key the first release gave this spec (it ignored the model seed, device and evaluation interval)."""
        return self._readable()

    def validate(self) -> None:
        """Refuse settings that cannot make a run, with the reason (problem and method are checked by the
        runner, which knows the registries)."""
        if self.batch not in ("full", "mini"):
            raise ValueError(f"Invalid batch mode {self.batch!r}: expected 'full' or 'mini'")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Invalid learning rate {self.lr!r}: expected a finite lr > 0")
        for name in ("iterations", "seed", "model_seed", "nproc"):
            value = getattr(self, name)
            least = 1 if name in ("iterations", "nproc") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"Invalid {name} {value!r}: expected an integer >= {least}")
        for name in ("eval_every", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Invalid {name} {value!r}: expected a positive integer or None")
        if self.size not in ("paper", "small", "tiny"):
            raise ValueError(f"Invalid size {self.size!r}: expected 'paper', 'small' or 'tiny'")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"Invalid dtype {self.dtype!r}: expected 'float32' or 'float64'")

    def evaluation_points(self) -> list[int]:
        every = self.eval_every or max(1, self.iterations // 100)
        return sorted({*range(0, self.iterations, every), self.iterations})
