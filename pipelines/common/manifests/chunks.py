"""What a manifest scan produces: chunks of whole rows and the scan's summary.

Plain data, shared by the scan (:mod:`pipelines.common.manifests.scan`), the readers and the
kept scans (:mod:`pipelines.common.manifests.scan_cache`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.common.manifests.rows import ManifestError, RowError


@dataclass
class Chunk:
    """Consecutive rows of one file: bytes ``[start, end)`` (JSON lines) or rows
    ``[start, end)`` within one row group (Parquet); ``line`` is the 1-based line (or row)
    number of its first row; ``skip`` lists rows that pass the row checks but repeat an
    earlier row's id (see ``pipelines.common.manifests.ids``)."""

    path: str
    fmt: str
    start: int
    end: int
    line: int
    rows: int  # rows in the chunk (non-blank lines)
    valid: int  # of them valid
    skip: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ManifestScan:
    """What a scan found: every chunk in order, counts and the first errors."""

    uri: str
    chunks: list[Chunk]
    rows: int = 0
    valid: int = 0
    error_count: int = 0
    errors: list[RowError] = field(default_factory=list)
    row_limit: int | None = None  # readers stop after this many valid rows

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def format_errors(self) -> str:
        lines = [e.format() for e in self.errors]
        if self.error_count > len(self.errors):
            lines.append(f"... and {self.error_count - len(self.errors)} more error(s)")
        return "\n".join(lines)

    def require_ok(self, skip_bad_rows: bool) -> None:
        """Fail naming the bad rows, unless they are to be skipped."""
        if self.error_count and not skip_bad_rows:
            raise ManifestError(f"manifest {self.uri}: {self.error_count} error(s) in "
                                f"{self.rows} rows (use skip_bad_rows=true to skip and report "
                                f"them):\n{self.format_errors()}")


@dataclass
class RangeResult:
    """What one scan task found in one byte range (line numbers relative to the range)."""

    chunks: list[dict] = field(default_factory=list)
    rows: int = 0
    valid: int = 0
    error_count: int = 0
    errors: list[dict] = field(default_factory=list)
    lines: int = 0  # lines in the range, blank ones included
    duplicates: list[dict] = field(default_factory=list)  # ids repeated within the range
