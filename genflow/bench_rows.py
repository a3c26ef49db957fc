"""The rows of ``genflow bench`` and how they are shown: one ``Row`` per genflow/baseline pair, its
console line (``row_line``, under ``HEADER``) and the markdown table of ``bench/RESULTS.md``
(``markdown_table``). The harness that fills the rows is ``genflow.bench``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

__all__ = ["COLUMNS", "HEADER", "Row", "markdown_table", "row_cells", "row_line", "row_notes"]


@dataclass
class Row:
    """One timed (or refused) comparison: genflow and one baseline of a case, their times and check."""

    group: str
    case: str
    size: str
    baseline: str
    kind: str
    status: str
    genflow_ms: Optional[float] = None
    baseline_ms: Optional[float] = None
    ratio: Optional[float] = None
    max_err: Optional[float] = None
    rel_err: Optional[float] = None
    tol: Optional[float] = None
    check: str = ""
    nfe_genflow: Optional[int] = None
    nfe_baseline: Optional[int] = None
    err_genflow: Optional[float] = None
    err_baseline: Optional[float] = None
    bytes: Optional[int] = None
    note: str = ""

    @property
    def ahead(self) -> str:
        """"yes" / "NO" for peers (ratio > 1: genflow faster), "-" for floors and untimed rows."""
        if self.kind != "peer" or self.ratio is None:
            return "-"
        return "yes" if self.ratio > 1.0 else "NO"

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["genflow_ahead"] = self.ahead
        return d


def fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 1 else f"{v:.3f}" if v < 100 else f"{v:.1f}"


def fmt_err(row: Row):
    if row.rel_err is None:
        return "-"
    return f"{row.rel_err:.1e}"


def fmt_nfe(row: Row):
    if row.nfe_genflow is None and row.nfe_baseline is None:
        return "-"
    return f"{row.nfe_genflow if row.nfe_genflow is not None else '-'}/{row.nfe_baseline if row.nfe_baseline is not None else '-'}"


def fmt_ratio(row: Row):
    return "-" if row.ratio is None else f"{row.ratio:.2f}"


def row_notes(row: Row) -> str:
    parts = []
    if row.status != "ok":
        parts.append(row.status)
    if row.err_genflow is not None or row.err_baseline is not None:
        parts.append(f"error vs reference: genflow {row.err_genflow:.1e}, {row.baseline} {row.err_baseline:.1e}")
    if row.note:
        parts.append(row.note)
    if row.bytes and row.baseline_ms:
        parts.append(f"{row.bytes / (row.baseline_ms * 1e-3) / 1e9:.1f} GB/s")
    return "; ".join(parts)


COLUMNS = [("case", 31, "<"), ("size", 11, "<"), ("vs", 29, "<"), ("genflow ms", 11, ">"), ("vs ms", 11, ">"),
           ("ratio", 7, ">"), ("ahead", 6, ">"), ("rel err", 8, ">"), ("NFE gf/vs", 10, ">")]


HEADER = " ".join(f"{n:{a}{w}}" for n, w, a in COLUMNS) + "  notes"


def row_cells(row: Row) -> list:
    return [row.case, row.size, row.baseline, fmt_ms(row.genflow_ms), fmt_ms(row.baseline_ms), fmt_ratio(row),
            row.ahead, fmt_err(row), fmt_nfe(row)]


def row_line(row: Row) -> str:
    out = " ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(row_cells(row), COLUMNS))
    notes = row_notes(row)
    return out + (f"  {notes}" if notes else "")


def markdown_table(rows: List[Row]) -> str:
    head = ["case", "size", "vs", "genflow ms", "vs ms", "ratio (vs / genflow)", "genflow ahead", "rel err",
            "NFE gf/vs", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = row_cells(r)
        if r.ahead == "NO":
            cells[6] = "**NO**"
        cells.append(row_notes(r).replace("|", "/"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
