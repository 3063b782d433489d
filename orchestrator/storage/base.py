"""storage/base: from orchestrator.store."""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from orchestrator.storage.files import CorruptArtifact


class StoreReads:
    """What every store derives from `read_bytes` (checksum-verified) and `manifest`."""

    def read_tensors(self, kind: str, key: str, name: str) -> dict[str, torch.Tensor]:
        return torch.load(io.BytesIO(self.read_bytes(kind, key, name)), weights_only=True)

    def read_json(self, kind: str, key: str, name: str) -> Any:
        return json.loads(self.read_bytes(kind, key, name))

    def meta(self, kind: str, key: str) -> dict:
        manifest = self.manifest(kind, key)
        if not manifest:
            raise CorruptArtifact(kind, key, "not in the store")
        return manifest["meta"]
