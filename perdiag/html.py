"""One self-contained HTML report: settings, a sortable per-layer table and every figure inline.

The file needs nothing from the network: images are ``data:image/png;base64`` URIs, the style and
the small sorting script are inline, and a Content-Security-Policy meta tag forbids any other
source, so the report opens the same offline, from an e-mail attachment or from an artifact store.
All text from the model (layer names, module types, settings, notes) is escaped with ``html.escape``.

Layout: title and notes; overview images (thumbnails, drawn eagerly); how to read the numbers
(:func:`perdiag.report.reference_lines`); the per-layer table (click a header to sort,
numerically where the column is numeric, NaN always last; distance cells coloured by
:func:`perdiag.report.distance_level`); settings; one collapsed ``<details>`` section per layer whose
images load lazily (``loading="lazy"``) when opened.

Size budget (checked by tests/test_html.py for 200 synthetic layers): the report must stay under
20 MB. Base64 adds a third, so the PNG bytes may total about 15 MB. Per-layer figures from
:func:`perdiag.plots.all_layer_images` at 60 dpi are 276 x 192 px and about 10-12 KB each, so 200
layers x 3 figures come to ~7 MB of PNG (~9.5 MB inline); the overview thumbnail grid and the SW1 bar
chart add well under 1 MB and the table a few hundred KB. Keep per-layer images under ~25 KB each.

Opening ``report.html#check-images`` switches every image to eager loading, waits for each to
decode and writes ``data-images-ok="ok/total"`` on ``<body>``: a headless browser test uses it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from perdiag.files import atomic_path
from perdiag.report import COLUMN_HEADERS, distance_level, format_value, json_ready, reference_lines

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: The report stays under this many bytes for a 200-layer model (see the module docstring).
SIZE_BUDGET_BYTES = 20 * 1024 * 1024

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 2px 6px; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.layers th { cursor: pointer; background: #f3f3f3; position: sticky; top: 0; user-select: none; }
table.layers th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.layers th[aria-sort="descending"]::after { content: " \\25BC"; }
td.good { background: #dff3df; } td.warn { background: #fff3c4; } td.bad { background: #f9d6d5; }
td.flags { color: #8a1c7c; font-weight: 600; }
figure { display: inline-block; margin: 0.3em; vertical-align: top; }
figcaption { font-size: 12px; color: #555; }
details { margin: 0.2em 0; } summary { cursor: pointer; font-family: monospace; }
ul.reference { font-size: 13px; color: #444; }
"""

# Sorting: numeric when every non-empty cell of the column parses as a number, else text with
# numeric-aware collation; empty (NaN) cells always last. The checker backs browser tests.
_SCRIPT = """
(function () {
  function key(cell) { return cell.getAttribute('data-v'); }
  function sortBy(table, index, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var descending = th.getAttribute('aria-sort') === 'ascending';
    var numeric = rows.every(function (row) {
      var v = key(row.cells[index]);
      return v === '' || isFinite(Number(v));
    });
    rows.sort(function (a, b) {
      var x = key(a.cells[index]), y = key(b.cells[index]);
      if (x === '' || y === '') { return (x === '') - (y === ''); }
      var order = numeric ? Number(x) - Number(y)
                          : x.localeCompare(y, undefined, {numeric: true, sensitivity: 'base'});
      if (order === 0) { order = Number(a.getAttribute('data-i')) - Number(b.getAttribute('data-i')); }
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', descending ? 'descending' : 'ascending');
  }
  document.querySelectorAll('table.layers').forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, index) {
      th.addEventListener('click', function () { sortBy(table, index, th); });
    });
  });
  function openTarget() {
    var target = location.hash && document.getElementById(location.hash.slice(1));
    if (target && target.tagName === 'DETAILS') { target.open = true; }
  }
  window.addEventListener('hashchange', openTarget);
  openTarget();
  function checkImages() {
    // Eager images delay the window's load event, so once it fires every image has loaded or
    // failed, and a synchronous check needs no promise that a headless --dump-dom could outrun.
    var images = Array.prototype.slice.call(document.images);
    document.querySelectorAll('details').forEach(function (d) { d.open = true; });
    images.forEach(function (img) { img.loading = 'eager'; });
    function record() {
      var ok = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
      document.body.setAttribute('data-images-ok', ok + '/' + images.length);
    }
    if (document.readyState === 'complete') { record(); } else { window.addEventListener('load', record); }
  }
  if (location.hash === '#check-images') { checkImages(); }
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk; ValueError if ``data`` is not a PNG."""
    if not isinstance(data, (bytes, bytearray)) or data[:8] != PNG_MAGIC or data[12:16] != b"IHDR":
        raise ValueError("expected PNG bytes (they must start with the PNG signature and an IHDR chunk)")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _img(data: bytes, alt: str, *, lazy: bool) -> str:
    width, height = png_size(data)
    encoded = base64.b64encode(data).decode("ascii")
    loading = ' loading="lazy" decoding="async"' if lazy else ""
    return (
        f'<img src="data:image/png;base64,{encoded}" alt="{_e(alt)}" width="{width}" height="{height}"{loading}>'
    )


def _sort_key(value: Any) -> str:
    """The raw value a cell sorts by: full-precision number, '' for NaN/None, or the text."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return ""
        return repr(number) if math.isfinite(number) else ("1e999" if number > 0 else "-1e999")
    return str(value)


def _layer_table(table: pd.DataFrame, anchors: Mapping[str, str]) -> str:
    columns = [str(column) for column in table.columns]
    head = "".join(f'<th scope="col" title="{_e(c)}">{_e(COLUMN_HEADERS.get(c, c))}</th>' for c in columns)
    rows = []
    for position, row in enumerate(table.itertuples(index=False, name=None)):
        cells = []
        for column, value in zip(columns, row):
            text = format_value(value, column)
            classes = []
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
                classes.append("num")
            level = distance_level(column, value)
            if level:
                classes.append(level)
            if column == "flags" and text:
                classes.append("flags")
            content = _e(text)
            if column == "layer" and str(value) in anchors:
                content = f'<a href="#{anchors[str(value)]}">{content}</a>'
            class_attr = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f'<td{class_attr} data-v="{_e(_sort_key(value))}">{content}</td>')
        rows.append(f'<tr data-i="{position}">{"".join(cells)}</tr>')
    return (
        '<div class="scroll"><table class="layers" id="layers">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _settings_table(settings: Mapping[str, Any]) -> str:
    rows = []
    for key, value in settings.items():
        text = value if isinstance(value, str) else json.dumps(json_ready(value), ensure_ascii=False)
        rows.append(f"<tr><th scope=\"row\">{_e(key)}</th><td>{_e(text)}</td></tr>")
    return f'<table class="settings">{"".join(rows)}</table>'


def _summary(name: str, row: Mapping[str, Any] | None) -> str:
    parts = [name]
    if row is not None:
        if "module_type" in row and isinstance(row["module_type"], str):
            parts.append(row["module_type"])
        for column in ("sw1", "per", "w1"):
            if column in row:
                parts.append(f"{column} {format_value(row[column], column)}")
        flags = row.get("flags")
        if isinstance(flags, str) and flags:
            parts.append(f"[{flags}]")
    return " — ".join(parts[:2]) + ("; " + ", ".join(parts[2:]) if len(parts) > 2 else "")


def build_html(
    *,
    title: str,
    settings: Mapping[str, Any],
    table: pd.DataFrame,
    overview_images: Mapping[str, bytes],
    layer_images: Mapping[str, Mapping[str, bytes]],
    notes: Sequence[str] = (),
) -> str:
    """The report as one HTML string (UTF-8 text, no external resources).

    Args:
        title: page title and heading.
        settings: the run's settings (shown as a key/value table, and read by ``reference_lines``).
        table: the per-layer table, one row per layer in model order; every column is shown.
        overview_images: ``{name: PNG bytes}`` shown at the top, e.g. from ``plots.overview_images``.
        layer_images: ``{layer name: {kind: PNG bytes}}``, e.g. from ``plots.all_layer_images``;
            layers appear in table order, then any layer the table lacks.
        notes: lines shown under the title (warnings, the command line, ...).

    Raises ValueError when an image is not PNG bytes.
    """
    layer_names = [str(name) for name in table["layer"]] if "layer" in table.columns else []
    ordered = layer_names + [name for name in layer_images if name not in set(layer_names)]
    ordered = [name for name in dict.fromkeys(ordered) if name in layer_images]
    anchors = {name: f"layer-{index}" for index, name in enumerate(ordered)}
    rows_by_name: dict[str, dict[str, Any]] = {}
    if layer_names:
        for record in table.to_dict(orient="records"):
            rows_by_name.setdefault(str(record["layer"]), record)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(note)}</li>" for note in notes) + "</ul>")
    if overview_images:
        parts.append('<h2>Overview</h2><div class="overview">')
        for name, data in overview_images.items():
            parts.append(f"<figure>{_img(data, name, lazy=False)}<figcaption>{_e(name)}</figcaption></figure>")
        parts.append("</div>")
    parts.append(f"<h2>Layers ({len(table)})</h2>")
    parts.append(
        '<ul class="reference">' + "".join(f"<li>{_e(line)}</li>" for line in reference_lines(settings)) + "</ul>"
    )
    parts.append("<p>Click a column header to sort; click a layer name for its plots.</p>")
    parts.append(_layer_table(table, anchors))
    parts.append("<h2>Settings</h2>")
    parts.append(_settings_table(settings))
    if ordered:
        parts.append("<h2>Per-layer plots</h2>")
        for name in ordered:
            images = layer_images[name]
            figures = "".join(
                f"<figure>{_img(data, f'{name} {kind}', lazy=True)}<figcaption>{_e(kind)}</figcaption></figure>"
                for kind, data in images.items()
            )
            summary = _summary(name, rows_by_name.get(name))
            parts.append(f'<details id="{anchors[name]}"><summary>{_e(summary)}</summary>{figures}</details>')
    parts.append(f"<script>{_SCRIPT}</script>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(path: str | os.PathLike, **arguments: Any) -> None:
    """Build the report (same keyword arguments as :func:`build_html`) and write it atomically."""
    text = build_html(**arguments)
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
