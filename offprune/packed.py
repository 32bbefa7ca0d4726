"""offprune's packed, lossless file format for pruned agents (`export_packed` / `load_packed`).

The packed file:
    MAGIC | u32 format version | u64 header length | JSON header | payload | sha256 of all before it
Each tensor is stored in the smallest of three encodings:
    raw     its bytes as they are (dense tensors, biases);
    bitmap  one bit per entry marking non-zeros + the non-zero values;
    gaps    LZMA-compressed gaps between non-zeros (a gap g is g//255 bytes of 255 then g%255) +
            the non-zero values; at 95% sparsity this is within ~3% of the mask's entropy.
Sparse encodings also list the positions of any -0.0 (gap-coded; empty for offprune's own runs,
whose pruned weights are +0.0), so every float round-trips bit for bit, NaN payloads included.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import offprune
from offprune import atomic
from offprune.algos.base import copy_sources_to_targets
from offprune.checkpoint import build_agent, load_run, stored_networks
from offprune.errors import UserError

MAGIC = b"OFFPRUNE-PACK\n"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<IQ")  # format version, header length
_DIGEST = 32


def _encode_gaps(positions: np.ndarray) -> bytes:
    gaps = np.diff(positions, prepend=-1) - 1
    full, rest = np.divmod(gaps, 255)
    counts = full + 1  # 'full' bytes of 255, then one byte 'rest'
    out = np.full(int(counts.sum()), 255, dtype=np.uint8)
    out[np.cumsum(counts) - 1] = rest
    return lzma.compress(out.tobytes(), preset=9 | lzma.PRESET_EXTREME)


def _decode_gaps(blob: bytes) -> np.ndarray:
    stream = np.frombuffer(lzma.decompress(blob), dtype=np.uint8).astype(np.int64)
    ends = np.flatnonzero(stream != 255)
    gaps = np.diff(np.cumsum(stream)[ends], prepend=0)
    return np.cumsum(gaps + 1) - 1


_NEGATIVE_ZERO = np.uint32(0x80000000)
_SPARSE_HEAD = struct.Struct("<QQ")  # bytes of the position part, bytes of the -0.0 part


def _encode_tensor(t: Tensor) -> tuple[str, bytes, int]:
    array = t.detach().contiguous().cpu().numpy()
    raw = array.tobytes()
    if array.dtype != np.float32 or array.size == 0:
        return "raw", raw, array.size
    flat = array.reshape(-1)
    bits = flat.view(np.uint32)
    nonzero = flat != 0
    values = bits[nonzero].tobytes()
    negative_zeros = np.flatnonzero(bits == _NEGATIVE_ZERO)
    neg = _encode_gaps(negative_zeros) if len(negative_zeros) else b""
    bitmap = np.packbits(nonzero).tobytes()
    candidates = [("raw", raw)]
    if len(bitmap) + len(values) < len(raw):  # sparse encodings only pay when the tensor is sparse
        for encoding, positions in (("bitmap", bitmap), ("gaps", _encode_gaps(np.flatnonzero(nonzero)))):
            candidates.append((encoding, _SPARSE_HEAD.pack(len(positions), len(neg)) + positions + neg + values))
    encoding, blob = min(candidates, key=lambda c: len(c[1]))
    return encoding, blob, int(nonzero.sum())


def _decode_tensor(entry: dict, blob: bytes) -> Tensor:
    dtype = np.dtype(entry["dtype"])
    shape = tuple(entry["shape"])
    n = int(np.prod(shape, dtype=np.int64))
    if entry["encoding"] == "raw":
        return torch.from_numpy(np.frombuffer(blob, dtype=dtype, count=n).copy().reshape(shape))
    if entry["encoding"] not in ("bitmap", "gaps"):
        raise UserError(f"unknown tensor encoding '{entry['encoding']}' in packed file")
    position_bytes, neg_bytes = _SPARSE_HEAD.unpack_from(blob)
    start = _SPARSE_HEAD.size
    part = blob[start : start + position_bytes]
    if entry["encoding"] == "bitmap":
        positions = np.flatnonzero(np.unpackbits(np.frombuffer(part, np.uint8), count=n))
    else:
        positions = _decode_gaps(part)
    start += position_bytes
    bits = np.zeros(n, dtype=np.uint32)
    if neg_bytes:
        bits[_decode_gaps(blob[start : start + neg_bytes])] = _NEGATIVE_ZERO
    start += neg_bytes
    values = np.frombuffer(blob[start:], dtype=np.uint32)
    if len(values) != len(positions) or len(positions) != entry["nnz"]:
        raise UserError("packed file is inconsistent: position count differs from value count")
    bits[positions] = values
    return torch.from_numpy(bits.view(np.float32).reshape(shape))


def pack_networks(networks: dict[str, nn.Module], agent_spec: dict | None = None) -> bytes:
    """The packed file's bytes for `networks` (name -> module)."""
    payload = bytearray()
    entries: dict[str, list[dict]] = {}
    for name, module in networks.items():
        entries[name] = []
        for key, t in module.state_dict().items():
            encoding, blob, nnz = _encode_tensor(t)
            entries[name].append({
                "name": key, "shape": list(t.shape), "dtype": str(t.detach().cpu().numpy().dtype),
                "encoding": encoding, "offset": len(payload), "nbytes": len(blob), "nnz": nnz,
            })
            payload += blob
    header = json.dumps({
        "format_version": FORMAT_VERSION,
        "offprune_version": offprune.__version__,
        "torch_version": torch.__version__,
        "agent": agent_spec,
        "payload_bytes": len(payload),
        "networks": entries,
    }, separators=(",", ":")).encode()
    body = MAGIC + _PREFIX.pack(FORMAT_VERSION, len(header)) + header + bytes(payload)
    return body + hashlib.sha256(body).digest()


def export_packed(run: str | Path, out: str | Path) -> Path:
    """Write every stored network of a run (or checkpoint) to `out` in the packed format, atomically."""
    return write_packed(*load_run(run), out)


def write_packed(agent, ckpt: dict, out: str | Path) -> Path:
    """Write an agent loaded by load_run to `out` in the packed format, atomically."""
    data = pack_networks(stored_networks(agent), ckpt["agent"])
    return atomic.write_bytes(out, data)


def read_packed(path: str | Path) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """(header, {network: state_dict}) after checking magic, version, length and checksum."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read packed file {path} ({e.strerror or e})") from None
    fixed = len(MAGIC) + _PREFIX.size
    if not data.startswith(MAGIC):
        raise UserError(f"{path}: not an offprune packed file")
    if len(data) < fixed + _DIGEST:
        raise UserError(f"{path}: packed file is truncated")
    version, header_len = _PREFIX.unpack_from(data, len(MAGIC))
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: packed format version {version} is newer than this offprune reads "
                        f"({FORMAT_VERSION}); upgrade offprune")
    try:
        header = json.loads(data[fixed : fixed + header_len])
        expected = fixed + header_len + header["payload_bytes"] + _DIGEST
    except (ValueError, KeyError, UnicodeDecodeError):
        raise UserError(f"{path}: packed file is truncated or its header is corrupt") from None
    if len(data) < expected:
        raise UserError(f"{path}: packed file is truncated ({len(data)} of {expected} bytes)")
    body, digest = data[: expected - _DIGEST], data[expected - _DIGEST : expected]
    if len(data) != expected or hashlib.sha256(body).digest() != digest:
        raise UserError(f"{path}: checksum mismatch: the packed file was altered or is corrupt")
    payload = memoryview(body)[fixed + header_len :]
    states = {
        name: {e["name"]: _decode_tensor(e, bytes(payload[e["offset"] : e["offset"] + e["nbytes"]])) for e in entries}
        for name, entries in header["networks"].items()
    }
    return header, states


def load_packed_agent(path: str | Path):
    """An agent (on CPU) whose stored networks hold exactly the packed weights."""
    header, states = read_packed(path)
    if not header.get("agent"):
        raise UserError(f"{path}: packed file has no agent description")
    agent = build_agent(header["agent"])
    for name, state in states.items():
        agent.modules[name].load_state_dict(state)
    copy_sources_to_targets(agent)  # targets start as copies of their sources
    return agent


def load_packed(path: str | Path) -> dict[str, nn.Module]:
    """Network name -> nn.Module with weights bit-identical to those exported."""
    return stored_networks(load_packed_agent(path))


