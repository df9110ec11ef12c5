"""Read what an offline W&B run recorded (``wandb/offline-run-*/run-*.wandb``).

wandb ships no reader for its run files. The format is a LevelDB-style log: a 7-byte file
header (``:W&B``, magic, version), then 32 KiB blocks of records, each behind a 7-byte header
(CRC32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last piece). Each record's
bytes are a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32 * 1024
HEADER_SIZE = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> Iterator[Any]:
    """Yield every ``Record`` protobuf stored in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no ':W&B' header).")
    offset, pieces = HEADER_SIZE, []
    while offset + HEADER_SIZE <= len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < HEADER_SIZE:  # block trailer padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + HEADER_SIZE])
        offset += HEADER_SIZE
        payload = data[offset:offset + length]
        offset += length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            offset += BLOCK_SIZE - offset % BLOCK_SIZE if offset % BLOCK_SIZE else 0
            continue
        pieces.append(payload)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The rows logged with ``run.log``, as dicts of decoded JSON values."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def read_summary(path: str | Path) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def find_run_file(run_dir: str | Path) -> Path:
    """The single ``run-*.wandb`` file of the offline run under ``run_dir/wandb``."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {run_dir}/wandb")
    return files[-1]
