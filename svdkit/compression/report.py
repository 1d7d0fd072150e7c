"""What ``svdkit.compress`` returns: per-module ranks, kept energy and calibration error, and the totals."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from svdkit.compression.engine import ModuleRow


@dataclass
class CompressionReport:
    """method/config, one :class:`ModuleRow` per target, parameter totals of the targets, seconds, and the
    peak bytes of calibration statistics held at once (``statistics_peak_bytes``; all of them for a
    precomputed ``Calibration``, one block's for the layer-by-layer path)."""

    method: str
    config: dict
    rows: list[ModuleRow] = field(default_factory=list)
    seconds: float = 0.0
    statistics_peak_bytes: int = 0
    statistics_total_bytes: int = 0
    mode: str = "data-free"

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.rows)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.rows)

    @property
    def removed(self) -> float:
        """The achieved ratio: fraction of the targets' parameters removed."""
        return 1.0 - self.params_after / max(self.params_before, 1)

    def ranks(self) -> dict[str, int | None]:
        return {r.name: r.rank for r in self.rows}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config, "mode": self.mode, "seconds": self.seconds,
                "params_before": self.params_before, "params_after": self.params_after, "removed": self.removed,
                "statistics_peak_bytes": self.statistics_peak_bytes,
                "statistics_total_bytes": self.statistics_total_bytes,
                "modules": [dataclasses.asdict(r) for r in self.rows]}  # fmt: skip

    def to_markdown(self) -> str:
        fmt = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
        lines = [f"## {self.method}: {self.removed:.1%} of {self.params_before:,} target parameters removed "
                 f"(asked {self.config.get('ratio')}) in {self.seconds:.1f} s ({self.mode})", "",
                 f"Calibration statistics held at once: {self.statistics_peak_bytes / 2**20:.1f} MiB "
                 f"(all modules' together: {self.statistics_total_bytes / 2**20:.1f} MiB).", "",
                 "| module | shape | rank | params after | kept energy | calibration error |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        for r in self.rows:
            rank = "dense" if r.rank is None else str(r.rank)
            lines.append(f"| {r.name} | {r.shape[0]}×{r.shape[1]} | {rank} | {r.params_after:,} | {fmt(r.kept_energy)} | {fmt(r.calibration_error)} |")
        return "\n".join(lines) + "\n"
