"""train.py's recipes: the model's size and the training arguments that a ``--recipe`` stands for.

Plain Python, no torch: train.py reads it (by path) to answer ``--help`` and check its arguments
before torch is imported, and benchmarks/time_to_accuracy.py trains with the same recipes.

- ``standard`` (train.py's default): 12 epochs of Adam with a one-cycle rate and ±2-pixel shifts, 99.4–99.5 % (docs/BENCHMARKS.md);
- ``fast``: the quickest way to 99 % found on a 2-core CPU: a narrower model, larger batches, one
  short one-cycle run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    schedule: str
    dropout: float
    shift: int
    model: dict = field(default_factory=dict)  # MnistNet's size: channels, hidden

    def arguments(self) -> dict:
        """The train.py arguments it sets, by their argparse names."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "optimizer": self.optimizer, "lr": self.lr,
                "schedule": self.schedule, "dropout": self.dropout, "shift": self.shift}


RECIPES = {
    "standard": Recipe(epochs=12, batch_size=64, optimizer="adam", lr=5e-3, schedule="onecycle", dropout=0.25, shift=2),
    "fast": Recipe(epochs=1, batch_size=128, optimizer="adam", lr=1e-2, schedule="onecycle", dropout=0.1, shift=1,
                   model={"channels": (16, 32), "hidden": 128}),
}
