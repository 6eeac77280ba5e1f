"""Array geometry: how a layer's rows and columns tile onto the hardware and the quantization grid."""
from __future__ import annotations


def row_passes(rows: int, pes: int) -> int:
    """Passes of a P-PE array over a layer's output rows, P rows per pass: ceil(rows / P). The last pass is
    partial when P does not divide the rows; its idle PEs compute zero rows."""
    return -(-rows // pes)


def group_count(cols: int, group_size: int) -> int:
    """Quantization groups along `cols` input columns: ceil(cols / group_size), the last one shorter when it
    does not divide; group_size -1 is one group per row (none for an empty row)."""
    if cols == 0:
        return 0
    return 1 if group_size == -1 else -(-cols // group_size)
