"""The one error type for bad data: it names the dataset, the path, and the layout expected."""

from __future__ import annotations

from pathlib import Path


class DatasetError(RuntimeError):
    def __init__(self, dataset: str, path: str | Path, problem: str, layout: str):
        self.dataset, self.path, self.problem, self.layout = dataset, str(path), problem, layout
        super().__init__(f"{dataset}: {problem}: {path}\nexpected layout:\n{layout}")

    def __reduce__(self):  # crosses process boundaries (Ray workers) with its message intact
        return type(self), (self.dataset, self.path, self.problem, self.layout)
