"""perdiag.html: one self-contained file, images that decode, sortable table, size budget."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from perdiag import html as report_html
from perdiag import plots
from perdiag.plots import LayerPlotData
from perdiag.report import REQUIRED_COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETTINGS = {"model": "model.pt", "loading": "torchscript", "seed": 0, "n_projections": 256,
            "reservoir_size": 1000, "perdiag_version": "0.1.0", "torch_version": "2.13", "note": "<b>x</b>"}


def make_layer(name: str, seed: int) -> LayerPlotData:
    rng = np.random.default_rng(seed)
    kind = seed % 3
    pooled = [rng.standard_normal(20_000), np.maximum(rng.standard_normal(20_000), 0), rng.exponential(1, 20_000)][kind]
    edges = np.linspace(-8, 8, 257)
    counts, _ = np.histogram(pooled, edges)
    return LayerPlotData(
        name=name, hist_counts=counts, hist_edges=edges, n_below=0, n_above=int((pooled > 8).sum()),
        values=rng.choice(pooled, 1000), projected=(1 + 0.4 * kind) * rng.standard_normal(4000),
        sw1=0.01 + 0.3 * kind, per=1.13 + 0.2 * kind, w1=0.02 + 0.3 * kind,
    )


def make_table(names, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i, name in enumerate(names):
        row = {column: float(rng.uniform(0, 2)) for column in REQUIRED_COLUMNS}
        row.update(layer=name, module_type="Conv2d", shape=f"(B, {4 * (i + 1)}, 8, 8)", n_samples=1000,
                   n_units=4 * (i + 1), n_nonfinite=0, flags="dead" if i == 1 else "")
        rows.append(row)
    table = pd.DataFrame(rows)
    table.loc[0, "sw1"] = np.nan
    return table


def build(names, *, dpi: float = 60) -> str:
    datas = [make_layer(name, seed) for seed, name in enumerate(names)]
    table = make_table(names)
    return report_html.build_html(
        title="perdiag <report>", settings=SETTINGS, table=table,
        overview_images=plots.overview_images(datas, table),
        layer_images=plots.all_layer_images(datas, dpi=dpi), notes=["checked <script>alert(1)</script>"],
    )


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text.append(data)


NAMES = ["features.0", "features.1<&>", "classifier.fc"]


@pytest.fixture(scope="module")
def page() -> str:
    return build(NAMES)


def parse(text: str) -> _Collector:
    collector = _Collector()
    collector.feed(text)
    return collector


def test_images_are_inline_pngs(page):
    parsed = parse(page)
    assert len(parsed.images) == 2 + 3 * len(NAMES)  # overview + bars, three per layer
    for image in parsed.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix)
        data = base64.b64decode(image["src"][len(prefix):], validate=True)
        assert data[:8] == PNG_MAGIC
        assert (int(image["width"]), int(image["height"])) == report_html.png_size(data)
    lazy = [image for image in parsed.images if image.get("loading") == "lazy"]
    assert len(lazy) == 3 * len(NAMES)


def test_no_external_resources(page):
    parsed = parse(page)
    assert all(not link.lower().startswith(("http:", "https:", "//")) for link in parsed.links)
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_text_is_escaped(page):
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "features.1&lt;&amp;&gt;" in page
    assert "<title>perdiag &lt;report&gt;</title>" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page  # settings values too
    text = "".join(parse(page).text)
    assert all(name in text for name in NAMES)


def test_structure(page):
    parsed = parse(page)
    assert parsed.tags.count("details") == len(NAMES)
    assert 'data-v=""' in page  # the NaN sw1 sorts last, shown as a dash
    assert "PER reference" in page and "0.0019" in page
    assert 'class="num bad"' in page or 'class="num warn"' in page
    assert page.index('id="layer-0"') < page.index('id="layer-1"') < page.index('id="layer-2"')


def test_rejects_non_png():
    with pytest.raises(ValueError, match="PNG"):
        report_html.build_html(title="t", settings={}, table=make_table(["a"]), overview_images={"x": b"GIF89a"},
                               layer_images={})


def test_write_html_atomic(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old report")
    arguments = dict(title="t", settings={}, table=make_table(["a"]), overview_images={}, layer_images={})
    report_html.write_html(path, **arguments)
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    path.write_text("old report")

    def explode(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(report_html, "build_html", explode)
    with pytest.raises(RuntimeError):
        report_html.write_html(path, **arguments)
    assert path.read_text() == "old report"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _dump_dom(browser: str, url: str, profile) -> str:
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_chromium_renders_every_image_and_sorts(tmp_path, page):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH (apt-get install chromium)")
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    dom = _dump_dom(browser, path.as_uri() + "#check-images", tmp_path / "profile")
    total = 2 + 3 * len(NAMES)
    assert f'data-images-ok="{total}/{total}"' in dom
    for name in ("features.0", "features.1&lt;&amp;&gt;", "classifier.fc"):
        assert name in dom

    # Sorting: a page whose script clicks the sw1 header, then records the row order.
    sorter = page.replace(
        "</body>",
        "<script>var th=[].find.call(document.querySelectorAll('table.layers th'),function(h){return h.title==='sw1';});"
        "th.click();document.body.setAttribute('data-order',[].map.call(document.querySelectorAll("
        "'table.layers tbody tr'),function(r){return r.cells[0].textContent;}).join('|'));</script></body>",
    )
    sorted_path = tmp_path / "sorted.html"
    sorted_path.write_text(sorter, encoding="utf-8")
    dom = _dump_dom(browser, sorted_path.as_uri(), tmp_path / "profile2")
    table = make_table(NAMES)
    expected = [str(name) for name in table.iloc[1:].sort_values("sw1")["layer"]] + [NAMES[0]]  # NaN last
    order = dom.split('data-order="', 1)[1].split('"', 1)[0]
    assert order.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").split("|") == expected


@pytest.mark.slow
def test_200_layer_report_under_budget(tmp_path):
    names = [f"encoder.layers.{i // 4}.block.{['conv1', 'bn1', 'relu', 'conv2'][i % 4]}" for i in range(200)]
    start = time.perf_counter()
    datas = [make_layer(name, seed) for seed, name in enumerate(names)]
    table = make_table(names)
    path = tmp_path / "report.html"
    report_html.write_html(
        path, title="200 layers", settings=SETTINGS, table=table,
        overview_images=plots.overview_images(datas, table), layer_images=plots.all_layer_images(datas),
    )
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    print(f"200-layer report: {size / 1e6:.2f} MB in {seconds:.1f} s")
    assert size < report_html.SIZE_BUDGET_BYTES
    assert len(parse(path.read_text(encoding="utf-8")).images) == 2 + 600
