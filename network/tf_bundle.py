"""Read TensorFlow-1 checkpoints (the V2 "tensor bundle": ``<prefix>.index`` + ``<prefix>.data-*``)
without TensorFlow.

The ``.index`` file is a LevelDB-style sorted table: data blocks of prefix-compressed
``key -> value`` entries, an index block, and a 48-byte footer ending in a magic number. The entry
with the empty key is a ``BundleHeaderProto``; every other key is a variable name whose value is a
``BundleEntryProto`` (dtype, shape, shard, offset, size). The tensor's bytes are at ``offset`` in
``<prefix>.data-<shard>-of-<shards>``, little-endian, row-major (TF layout: channels last).

Only what the published checkpoints use is supported: uncompressed tables, numeric dense tensors.
Tensor checksums (crc32c) are not verified; sizes and bounds are. Every fault raises
:class:`TFCheckpointError` with one line naming the file.
"""
from __future__ import annotations

import os
import re
import struct

import numpy as np

from .errors import ToolkitError

_MAGIC = 0xdb4775248b80fb57
_FOOTER = 48
# tensorflow/core/framework/types.proto DataType -> numpy
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
           9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}


class TFCheckpointError(ToolkitError):
    """A TensorFlow checkpoint that is missing, truncated, corrupt or of an unsupported kind."""


def _varint(buf: bytes, pos: int) -> tuple:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _proto_fields(buf: bytes) -> list:
    """``[(field_number, value)]`` of a protobuf message: ints for varints, bytes for the rest."""
    out, pos = [], 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        out.append((number, value))
    return out


def _block_entries(data: bytes, offset: int, size: int) -> list:
    """``[(key, value)]`` of one table block (``size`` excludes the 5-byte type + crc trailer)."""
    if offset + size + 5 > len(data):
        raise ValueError("block beyond the end of the file")
    if data[offset + size] != 0:
        raise ValueError(f"compressed table block (type {data[offset + size]}) is not supported")
    block = data[offset:offset + size]
    num_restarts = struct.unpack_from("<I", block, size - 4)[0]
    end = size - 4 - 4 * num_restarts
    if end < 0:
        raise ValueError("bad block restart array")
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + length]))
        pos += length
    if pos != end:
        raise ValueError("block entries overrun the restart array")
    return entries


def _handle(buf: bytes, pos: int = 0) -> tuple:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def _table(path: str) -> list:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _FOOTER or struct.unpack_from("<Q", data, len(data) - 8)[0] != _MAGIC:
        raise ValueError("not a TensorFlow checkpoint index (bad footer magic; truncated?)")
    footer = data[len(data) - _FOOTER:]
    _, _, pos = _handle(footer)                   # metaindex handle (unused)
    index_offset, index_size, _ = _handle(footer, pos)
    entries = []
    for _, handle in _block_entries(data, index_offset, index_size):
        offset, size, _ = _handle(handle)
        entries.extend(_block_entries(data, offset, size))
    return entries


def _entry(value: bytes) -> dict:
    entry = {"dtype": 0, "shape": [], "shard": 0, "offset": 0, "size": 0, "slices": False}
    for number, v in _proto_fields(value):
        if number == 1:
            entry["dtype"] = v
        elif number == 2:
            for dim_number, dim in _proto_fields(v):
                if dim_number == 2:                       # TensorShapeProto.dim
                    size = dict(_proto_fields(dim)).get(1, 0)
                    entry["shape"].append(size - (1 << 64) if size >= 1 << 63 else size)
                elif dim_number == 3 and v:               # unknown_rank
                    raise ValueError("tensor of unknown rank")
        elif number in (3, 4, 5):
            entry[{3: "shard", 4: "offset", 5: "size"}[number]] = v
        elif number == 7:
            entry["slices"] = True
    return entry


class TFCheckpoint:
    """Variables of one TF-1 checkpoint: ``shapes`` ``{name: shape}``, ``read(name) -> ndarray``.

    ``prefix`` is the path without the suffix (``.../model-20000``).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        index = prefix + ".index"
        if not os.path.isfile(index):
            raise TFCheckpointError(f"{index}: not found")
        try:
            entries = _table(index)
        except (ValueError, struct.error) as e:
            raise TFCheckpointError(f"{index}: {e}") from None
        except OSError as e:
            raise TFCheckpointError(f"{index}: cannot read ({e.strerror or e})") from None
        self.num_shards = 1
        self.entries = {}
        for key, value in entries:
            try:
                if key == b"":
                    self.num_shards = dict(_proto_fields(value)).get(1, 1)
                    continue
                self.entries[key.decode("utf-8")] = _entry(value)
            except (ValueError, UnicodeDecodeError) as e:
                raise TFCheckpointError(f"{index}: bad entry {key[:60]!r}: {e}") from None
        self.shapes = {k: tuple(e["shape"]) for k, e in self.entries.items()}

    def data_file(self, shard: int) -> str:
        return f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}"

    def read(self, name: str) -> np.ndarray:
        """The variable's value as a numpy array in TF layout."""
        e = self.entries[name]
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None or e["slices"]:
            raise TFCheckpointError(f"{self.prefix}: variable {name} has an unsupported type "
                                    f"(dtype {e['dtype']}{', sliced' if e['slices'] else ''})")
        count = int(np.prod(e["shape"], dtype=np.int64))
        if count * np.dtype(dtype).itemsize != e["size"]:
            raise TFCheckpointError(f"{self.prefix}: variable {name}: {e['size']} bytes do not hold shape "
                                    f"{tuple(e['shape'])}")
        path = self.data_file(e["shard"])
        try:
            with open(path, "rb") as f:
                f.seek(e["offset"])
                raw = f.read(e["size"])
        except OSError as e2:
            raise TFCheckpointError(f"{path}: cannot read ({e2.strerror or e2})") from None
        if len(raw) != e["size"]:
            raise TFCheckpointError(f"{path}: truncated (variable {name} needs bytes {e['offset']}.."
                                    f"{e['offset'] + e['size']})")
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(e["shape"]).copy()


_STEP = re.compile(r"-(\d+)$")


def checkpoint_prefixes(folder: str) -> dict:
    """``{step: prefix}`` of the ``model-<step>.index`` checkpoints in a TF run folder."""
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".index"):
            m = _STEP.search(name[:-len(".index")])
            if m:
                out[int(m.group(1))] = os.path.join(folder, name[:-len(".index")])
    return out


def is_tf_folder(folder: str) -> bool:
    """True for a folder holding TF-1 checkpoints (``checkpoint`` file or ``*.index`` files)."""
    return os.path.isdir(folder) and bool(checkpoint_prefixes(folder))


def resolve_prefix(spec: str) -> tuple:
    """``DIR`` (latest, or the ``checkpoint`` file's), ``DIR:STEP`` or a prefix -> ``(prefix, step)``."""
    m = re.match(r"^(.*):(\d+)$", spec)
    folder, step = (m.group(1), int(m.group(2))) if m and not os.path.exists(spec) else (spec, None)
    if os.path.isfile(folder + ".index"):
        s = _STEP.search(folder)
        return folder, int(s.group(1)) if s else 0
    if not os.path.isdir(folder):
        raise TFCheckpointError(f"{folder}: TensorFlow checkpoint folder or prefix not found")
    found = checkpoint_prefixes(folder)
    if not found:
        raise TFCheckpointError(f"{folder}: no model-<step>.index files in this folder")
    if step is None:
        step = _listed_step(folder, found) or max(found)
    if step not in found:
        raise TFCheckpointError(f"{folder}: no checkpoint for step {step} (have {sorted(found)})")
    return found[step], step


def _listed_step(folder: str, found: dict):
    """The step named by the folder's ``checkpoint`` file (its path may be absolute, even Windows)."""
    path = os.path.join(folder, "checkpoint")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r'^model_checkpoint_path:\s*"([^"]*)"', text, re.M)
    if not m:
        return None
    s = _STEP.search(re.split(r"[\\/]", m.group(1))[-1])
    return int(s.group(1)) if s and int(s.group(1)) in found else None
