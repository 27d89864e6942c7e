"""imagenetpp report and compare: dataset metrics of finished shifts (see build.py)."""

from .build import REPORT_DIR, Report, load_metrics, report_options, write_report
from .compare import compare_html, compare_rows, compare_table

__all__ = [
    "REPORT_DIR", "Report", "load_metrics", "report_options", "write_report",
    "compare_html", "compare_rows", "compare_table",
]  # fmt: skip
