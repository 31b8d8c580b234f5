"""sqpoptim: hard-constrained training of neural networks."""

__version__ = "0.1.0"
__all__: list[str] = []
