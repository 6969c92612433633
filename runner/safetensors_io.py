"""safetensors files written byte for byte deterministically: the same tensors and metadata, the same
bytes. The library serialises metadata in hash order, so dbl writes the format itself (a little-endian
header length, a JSON header with sorted keys padded to 8 bytes, then the tensors' bytes in name order);
it reads with the library. torch and safetensors are imported inside functions.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from runner.errors import AdapterError

_DTYPE_CODES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file whose bytes depend only on the tensors and metadata (sorted keys)."""
    data = safetensors_bytes(tensors, metadata)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    tmp.replace(path)


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a .safetensors file of `tensors` (see write_safetensors)."""
    import torch

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        code = _DTYPE_CODES.get(str(t.dtype).removeprefix("torch."))
        if code is None:
            raise AdapterError(f"cannot store tensor {name} of dtype {t.dtype}")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return b"".join([struct.pack("<Q", len(head)), head, *blobs])


def read_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    """Tensors and metadata of a .safetensors file (on the CPU)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def same_values(a, b) -> bool:
    """torch.equal(a, b): the same shape and every value equal (NaN equals none). CPU floats are compared
    by numpy, in one pass: torch.equal wakes its threads for every tensor of more than a few thousand values,
    about 10 ms a tensor on a busy 2-core machine (most of the time a built-in model took to load)."""
    import numpy as np
    import torch

    numpy_floats = (torch.float16, torch.float32, torch.float64)
    if a.device.type == b.device.type == "cpu" and a.dtype == b.dtype and a.dtype in numpy_floats:
        return a.shape == b.shape and bool(np.array_equal(a.detach().numpy(), b.detach().numpy()))
    return torch.equal(a, b)
