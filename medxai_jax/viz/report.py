"""A self-contained HTML report assembled from sections (text, tables, figures)."""

from __future__ import annotations

import dataclasses
import datetime
import html
import os
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class Table:
  """A table with a header row; cells are formatted with `format_cell`."""

  header: Sequence[str]
  rows: Sequence[Sequence[Any]]
  caption: str = ""


@dataclasses.dataclass(frozen=True)
class Figure:
  """A PNG (path relative to the report) with a caption."""

  path: str
  caption: str = ""


@dataclasses.dataclass(frozen=True)
class Section:
  """A titled block of paragraphs, tables and figures, in that order."""

  title: str
  paragraphs: Sequence[str] = ()
  tables: Sequence[Table] = ()
  figures: Sequence[Figure] = ()


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; } .meta { color: #777; font-size: 0.85em; }
"""


def format_cell(value: Any) -> str:
  """Numbers to 4 significant digits, everything else as text (escaped)."""
  if isinstance(value, float):
    return f"{value:.4g}"
  return html.escape(str(value))


def _render_table(table: Table) -> str:
  head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.header)
  body = "".join("<tr>" + "".join(f"<td>{format_cell(c)}</td>" for c in row) + "</tr>"
                 for row in table.rows)
  caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
  return f"<table>{caption}<tr>{head}</tr>{body}</table>"


def _render_section(section: Section) -> str:
  parts = [f"<h2>{html.escape(section.title)}</h2>"]
  parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
  parts += [_render_table(t) for t in section.tables]
  parts += [f'<figure><img src="{html.escape(f.path)}" alt="{html.escape(f.caption)}">'
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>" for f in section.figures]
  return "\n".join(parts)


def render_report(title: str, sections: Sequence[Section]) -> str:
  """The whole HTML document."""
  stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  body = "\n".join(_render_section(s) for s in sections)
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
          f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
          f"<p class='meta'>Written {stamp} by medxai-jax.</p>{body}</body></html>")


def write_report(path: str, title: str, sections: Sequence[Section]) -> str:
  """Writes the report to `path` (figure paths are relative to its folder) and returns it."""
  missing = [f.path for s in sections for f in s.figures
             if not os.path.exists(os.path.join(os.path.dirname(path), f.path))]
  if missing:
    raise FileNotFoundError(f"Report figures not found next to {path}: {missing}")
  with open(path, "w") as f:
    f.write(render_report(title, sections))
  return path
