"""The records of an offline W&B run, read from its `.wandb` file after W&B has finished writing it.

Why not grep the bytes: `wandb.finish()` only tells wandb-core that the run is over; wandb-core closes
(and flushes) the run's file afterwards, on its own schedule, so a file read right after `finish()`
may still hold only its 7-byte header. `wandb.teardown()` waits for wandb-core to exit, which closes
every run's file, so the records read after it are complete. (The next `wandb.init` starts a new
wandb-core.)

wandb 0.31 ships no Python reader for `.wandb` files (the old `wandb.sdk.internal.datastore` went with
the Python backend), so this reads the format itself: a 7-byte header (":W&B", magic 0xBEE1, version
0), then LevelDB log blocks of 32 KiB whose chunks (CRC-32, length, type) carry one serialized
`wandb_internal_pb2.Record` each, split over blocks when long. See
https://github.com/google/leveldb/blob/main/doc/log_format.md.
"""
from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def finish_and_flush() -> None:
    """Finishes the active run, if any, and waits for wandb-core to write every run's file to disk."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def read_records(path: str | Path) -> list:
    """Every record of a `.wandb` file, decoded (`wandb.proto.wandb_internal_pb2.Record`), in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[: len(HEADER)] == HEADER, f"{path}: not a W&B transaction log"
    records, pending, pos = [], b"", len(HEADER)
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        assert len(chunk) == length, f"{path}: truncated chunk at byte {pos}"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


class WandbRun:
    """What an offline run folder (`.../wandb/offline-run-*`) recorded: config, history rows, summary, tags."""

    def __init__(self, run_dir: str | Path) -> None:
        files = list(Path(run_dir).glob("*.wandb"))
        assert len(files) == 1, f"{run_dir}: expected one .wandb file, found {files}"
        self.records = read_records(files[0])
        kinds = [r.WhichOneof("record_type") for r in self.records]
        assert "run" in kinds and "exit" in kinds, f"{files[0]}: incomplete run (records: {sorted(set(kinds))})"
        self.config: dict = {}
        self.history: list[dict] = []
        self.summary: dict = {}
        self.tags: list[str] = []
        for record in self.records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.tags = list(record.run.tags)
                self._config(record.run.config)
            elif kind == "config":
                self._config(record.config)
            elif kind == "history":
                self.history.append({self._key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                self.summary.update({self._key(i): json.loads(i.value_json) for i in record.summary.update})

    @staticmethod
    def _key(item) -> str:
        return item.key or "/".join(item.nested_key)

    def _config(self, config) -> None:
        for item in config.update:
            self.config[self._key(item)] = json.loads(item.value_json)

    def metric_keys(self) -> set[str]:
        """Every key logged in a history row."""
        return {k for row in self.history for k in row}
