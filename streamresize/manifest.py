"""Resume state in the work dir: which blocks are done, their shards' checksums, and a signature."""

import json
import os

from .errors import StreamResizeError
from .writer import atomic_write_bytes

MANIFEST = "manifest.json"


class Manifest:
    """Replaced atomically after every finished step; a crash loses at most the step in flight."""

    def __init__(self, work_dir, signature, world_size=1):
        self.path = os.path.join(work_dir, MANIFEST)
        self.state = {"signature": signature, "next_block": -1, "current_cache": None,
                      "shards": {}, "weight_map": {}, "log": []}
        if world_size != 1:  # processes of a data-parallel run; a single process's manifest stays as it was
            self.state["world_size"] = world_size

    @classmethod
    def open(cls, work_dir, signature, restart, world_size=1):
        """The saved state of this run, or a new one. A run saved with another number of processes is
        refused: each process's activation cache holds its own share of the sequences."""
        manifest = cls(work_dir, signature, world_size)
        if os.path.exists(manifest.path) and not restart:
            try:
                with open(manifest.path) as f:
                    state = json.load(f)
            except ValueError as e:
                raise StreamResizeError(f"{manifest.path}: corrupt manifest ({e}); rerun with --restart") from e
            if state.get("signature") != signature:
                changed = [k for k in signature if state.get("signature", {}).get(k) != signature[k]]
                raise StreamResizeError(
                    f"{manifest.path}: the work dir belongs to a different run (changed: {', '.join(changed)}); "
                    "rerun with --restart to start over, or choose another --work-dir")
            saved = state.get("world_size", 1)
            if saved != world_size:
                raise StreamResizeError(
                    f"{manifest.path}: this run was started with {saved} process(es) (WORLD_SIZE {saved}) and is "
                    f"now resumed with {world_size}; each process's activation cache holds its own share of the "
                    f"calibration sequences, so resume with {saved} process(es), or rerun with --restart to "
                    "start over")
            manifest.state = state
        return manifest

    @property
    def next_block(self):
        """-1 while the embedding point is unfinished, then the first unfinished block."""
        return self.state["next_block"]

    def record(self, next_block, current_cache, shards, weight_map, log_entry):
        self.update(next_block, current_cache, shards, weight_map, log_entry)
        self.save(self.serialize())

    def update(self, next_block, current_cache, shards, weight_map, log_entry):
        """The state in memory only; `save` makes it the commit point."""
        self.state["next_block"] = next_block
        self.state["current_cache"] = current_cache
        self.state["shards"].update(shards)
        self.state["weight_map"].update(weight_map)
        self.state["log"].append(log_entry)

    def serialize(self):
        return (json.dumps(self.state, indent=2, sort_keys=True) + "\n").encode()

    def save(self, data):
        """Replace the file atomically with `data` (from `serialize`, possibly taken earlier)."""
        atomic_write_bytes(self.path, data)
