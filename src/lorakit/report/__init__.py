"""Run and sweep reports: summaries read from run folders, inline-SVG charts, one self-contained HTML file."""

from .html import write_report

__all__ = ["write_report"]
