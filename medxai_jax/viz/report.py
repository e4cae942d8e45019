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
body { font-family: system-ui, sans-serif; margin: 1.5em 2.5vw; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; margin-top: 1.8em; }
p, figcaption, nav { max-width: 80ch; }
.table-scroll { max-width: 100%; overflow-x: auto; margin: 0.6em 0; }
table { border-collapse: separate; border-spacing: 0; font-size: 0.9em; }
.caption { font-size: 0.85em; color: #555; margin: 0.8em 0 0.2em 0; }
th, td { border: 1px solid #ccc; border-width: 0 1px 1px 0; padding: 3px 8px; text-align: right;
         white-space: nowrap; background: #fff; }
tr:first-child th { border-top-width: 1px; background: #f4f4f4; }
th:first-child, td:first-child { text-align: left; position: sticky; left: 0; z-index: 1;
                                 border-left-width: 1px; background: #fafafa; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
figure img { max-height: 90vh; }
img { max-width: 100%; height: auto; } .meta { color: #777; font-size: 0.85em; }
nav a { margin-right: 1em; }
"""


def format_cell(value: Any) -> str:
  """Numbers to 4 significant digits, None (a JSON null) as 'n/a', everything else as text."""
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.4g}"
  return html.escape(str(value))


def _render_table(table: Table) -> str:
  head = "".join(f"<th>{html.escape(str(h))}</th>" for h in table.header)
  body = "".join("<tr>" + "".join(f"<td>{format_cell(c)}</td>" for c in row) + "</tr>"
                 for row in table.rows)
  caption = f"<p class='caption'>{html.escape(table.caption)}</p>" if table.caption else ""
  return f"{caption}<div class='table-scroll'><table><tr>{head}</tr>{body}</table></div>"


def section_anchor(index: int) -> str:
  """The id of the index-th section's heading (the table of contents links to it)."""
  return f"section-{index + 1}"


def _render_section(section: Section, anchor: str) -> str:
  parts = [f"<h2 id='{anchor}'>{html.escape(section.title)}</h2>"]
  parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
  parts += [_render_table(t) for t in section.tables]
  parts += [f'<figure><img src="{html.escape(f.path)}" alt="{html.escape(f.caption)}">'
            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>" for f in section.figures]
  return "\n".join(parts)


def render_report(title: str, sections: Sequence[Section]) -> str:
  """The whole HTML document."""
  stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  body = "\n".join(_render_section(s, section_anchor(i)) for i, s in enumerate(sections))
  contents = " ".join(f"<a href='#{section_anchor(i)}'>{html.escape(s.title)}</a>"
                      for i, s in enumerate(sections))
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
          f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
          f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
          f"<h1>{html.escape(title)}</h1><p class='meta'>Written {stamp} by medxai-jax.</p>"
          f"<nav>{contents}</nav>{body}</body></html>")


def write_report(path: str, title: str, sections: Sequence[Section]) -> str:
  """Writes the report to `path` (figure paths are relative to its folder) and returns it."""
  missing = [f.path for s in sections for f in s.figures
             if not os.path.exists(os.path.join(os.path.dirname(path), f.path))]
  if missing:
    raise FileNotFoundError(f"Report figures not found next to {path}: {missing}")
  with open(path, "w") as f:
    f.write(render_report(title, sections))
  return path
