"""Where weights come from: a Hugging Face safetensors checkpoint, or seeded random "dummy" weights.

Both answer `get(name, shape) -> Tensor` for a checkpoint tensor name, so loading code is the same. Dummy weights
are seeded per tensor name: every rank builds identical copies of any expert, whatever the placement.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors import safe_open


class SafetensorsSource:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {k: self.dir / f for k, f in weight_map.items()}
        else:
            self.file_of = {}
            for f in sorted(self.dir.glob("*.safetensors")):
                with safe_open(f, "pt") as h:
                    self.file_of.update({k: f for k in h.keys()})
        if not self.file_of:
            raise FileNotFoundError(f"no *.safetensors weights in {self.dir}")
        self._open: dict[Path, object] = {}

    def has(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.file_of:
            raise KeyError(f"checkpoint {self.dir} has no tensor {name!r}")
        f = self.file_of[name]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        t = self._open[f].get_tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != expected {tuple(shape)}")
        return t


class DummySource:
    def __init__(self, seed: int, device: torch.device, std: float = 0.02):
        self.seed, self.device, self.std = seed, device, std

    def has(self, name: str) -> bool:
        return True

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=self.device)
        g = torch.Generator(device=self.device)
        g.manual_seed(zlib.crc32(name.encode()) ^ self.seed)
        return torch.randn(shape, generator=g, device=self.device) * self.std
