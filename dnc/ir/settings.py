"""Settings that apply to the whole network, apart from the graph's nodes: one typed, frozen object.

Passes that choose a setting (dnc/ir/passes.py lists them apart from the rewrites) return
the graph with a new `Settings` in `graph.graph["settings"]`; every target and report
reads it from there. No torch here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import networkx as nx

from dnc.files import size_text

MemoryFormat = Literal["contiguous", "channels_last"]
# how 1x1 convolutions pick their kernel on the CPU: torch's own choice, or measured where the model runs
Conv1x1 = Literal["torch", "measured"]


@dataclass(frozen=True)
class Settings:
    memory_format: MemoryFormat = "contiguous"  # the layout the module runs in (its input converted inside forward)
    conv1x1: Conv1x1 = "torch"
    # in eval, convs may also take oneDNN's kernel with the weight kept packed (measured); 3x3s choose too (conv1x1)
    packed_weights: bool = False
    batch_tile_bytes: int = 0  # dense blocks and transitions run batch tiles of at most this many bytes; 0: whole

    @property
    def eval_only(self) -> str:
        """Why these settings hold only in eval mode, or "" (batch tiles: a training batch norm spans the batch)."""
        return "batch tiles" if self.batch_tile_bytes else ""

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)

    def notes(self) -> list[str]:
        """The settings that differ from the defaults, in words (for `dnc ir`, summaries and headers)."""
        out = []
        if self.memory_format != "contiguous":
            out.append(self.memory_format)
        if self.conv1x1 != "torch":
            out.append(f"1x1 conv kernels {self.conv1x1}")
        if self.packed_weights:
            out.append("conv weights packed for oneDNN")
        if self.batch_tile_bytes:
            out.append(f"batch tiles of {size_text(self.batch_tile_bytes)}")
        return out


def settings(graph: nx.DiGraph) -> Settings:
    """The graph's settings (the defaults where no pass chose any)."""
    return graph.graph.get("settings") or Settings()
