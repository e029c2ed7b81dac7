"""Safetensors written as a stream: the header is planned from names and shapes, then tensors are
appended one at a time, so writing a model never holds more than the tensor being written.

    writer = ShardedWriter(out_dir, plan=[(name, shape), ...], dtype=torch.bfloat16, max_shard_bytes=5 * 2**30)
    for name, tensor in tensors_in_plan_order:
        writer.write(name, tensor)
    writer.close()   # model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json

The files follow the safetensors format (8-byte little-endian header size, JSON header padded to
8 bytes, ``__metadata__ = {"format": "pt"}``, data in header order without holes), as
``safetensors.torch.save_file`` writes them; the index is Hugging Face's sharded-checkpoint index.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from mtnlg.errors import UserError

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"--max-shard-size {text!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    size = int(float(m.group(1)) * base**power)
    if size < 1:
        raise UserError(f"--max-shard-size {text!r} must be positive")
    return size


class ShardedWriter:
    def __init__(self, directory: str | Path, plan: Sequence[tuple[str, Sequence[int]]], dtype: torch.dtype,
                 max_shard_bytes: int):
        self.dir = Path(directory)
        self.dtype = dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, shape in plan:
            nbytes = math.prod(shape) * itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), nbytes))
            size += nbytes
        n = len(shards)
        self.files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self.total_bytes = sum(b for s in shards for _, _, b in s)
        self._queue = [(k, entry) for k, s in enumerate(shards) for entry in s]
        self._pos = 0
        self._file = None
        self._open_index = -1

    def _start(self, k: int) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, nbytes in self.shards[k]:
            header[name] = {"dtype": DTYPES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._file = open(self.dir / self.files[k], "wb")
        self._file.write(struct.pack("<Q", len(text)))
        self._file.write(text)
        self._open_index = k

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise ValueError(f"{name}: more tensors than planned")
        k, (want, shape, nbytes) = self._queue[self._pos]
        if name != want or tuple(tensor.shape) != shape:
            raise ValueError(f"expected {want} {list(shape)} next, got {name} {list(tensor.shape)}")
        if k != self._open_index:
            self._finish_file()
            self._start(k)
        data = tensor.detach().to("cpu", self.dtype).contiguous().reshape(-1).view(torch.uint8)
        assert data.numel() == nbytes
        self._file.write(data.numpy().data)
        self._pos += 1

    def _finish_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._pos != len(self._queue):
            raise ValueError(f"wrote {self._pos} of {len(self._queue)} planned tensors")
        self._finish_file()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: self.files[k] for k, s in enumerate(self.shards) for name, _, _ in s},
            }
            (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


class HFWeights:
    """Read-only access to the safetensors weights of a Hugging Face directory (single or sharded)."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{index} is not a safetensors index (no weight_map); re-save the model") from None
            files = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE).is_file():
            files = [SINGLE]
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                raise UserError(
                    f"{self.dir} has only PyTorch pickle weights ({', '.join(pickles[:3])}); mtnlg reads safetensors "
                    "only: load it in transformers and save_pretrained(dir, safe_serialization=True)"
                )
            raise UserError(f"{self.dir} has no *.safetensors weights")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, str] = {}
        for f in files:
            path = self.dir / f
            if not path.is_file():
                raise UserError(f"{path} (listed in {INDEX}) is missing")
            try:
                with safe_open(str(path), framework="pt", device="cpu") as h:
                    for k in h.keys():
                        self.shapes[k] = tuple(h.get_slice(k).get_shape())
                        self._where[k] = f
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from None

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        """One tensor (a copy). The file is mapped only while reading it, so memory stays bounded."""
        from safetensors import safe_open

        with safe_open(str(self.dir / self._where[name]), framework="pt", device="cpu") as h:
            return h.get_tensor(name)
