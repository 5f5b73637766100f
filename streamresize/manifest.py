"""Resume state in the work dir: which blocks are done, their shards' checksums, and a signature."""

import json
import os

from .errors import StreamResizeError
from .writer import atomic_write_bytes

MANIFEST = "manifest.json"


class Manifest:
    """Replaced atomically after every finished step; a crash loses at most the step in flight."""

    def __init__(self, work_dir, signature):
        self.path = os.path.join(work_dir, MANIFEST)
        self.state = {"signature": signature, "next_block": -1, "current_cache": None,
                      "shards": {}, "weight_map": {}, "log": []}

    @classmethod
    def open(cls, work_dir, signature, restart):
        manifest = cls(work_dir, signature)
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
