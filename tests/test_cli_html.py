"""`perdiag inspect --html` end to end: the sample CNN's report in a real browser, and a 200-layer model's size."""

from __future__ import annotations

import time

import pytest
import torch
from deep_models import DeepMLP
from test_html import _chromium, _dump_dom, parse

from perdiag.checkpoints import save_checkpoint
from perdiag.html import SIZE_BUDGET_BYTES


def test_inspect_report_renders_in_chromium(run_cli, samples, tmp_path):
    report = tmp_path / "cnn.html"
    code, out, err = run_cli("inspect", samples / "digits_cnn.pt", "--html", report, "--quiet")
    assert code == 0, err
    page = report.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert len(parse(page).images) == 2 + 3 * 9  # overview + SW1 bars, three figures for each of 9 layers
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH (apt-get install chromium)")
    # Decoding runs off the page's virtual clock: on a loaded machine the DOM can be dumped before the
    # check writes its result, so a missing result is retried.
    for attempt in range(3):
        dom = _dump_dom(browser, report.as_uri() + "#check-images", tmp_path / f"profile{attempt}")
        body = dom.split("<body", 1)[1].split(">", 1)[0]
        if "data-images-ok" in body:
            break
    assert 'data-images-ok="29/29"' in body, body
    for text in ("perdiag inspect: digits_cnn.pt", "features.conv1", "classifier.head", "Layers (9)", "Settings",
                 "digits_cnn_val.pt", "PER reference"):
        assert text in dom, text


@pytest.mark.slow
def test_200_layer_model_report_stays_under_budget(run_cli, tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "deep.pt", DeepMLP(depth=100, width=16), arch="deep_models:DeepMLP",
                    arch_kwargs={"depth": 100, "width": 16})
    torch.save(torch.randn(64, 16), tmp_path / "inputs.pt")
    report = tmp_path / "deep.html"
    start = time.perf_counter()
    code, _, err = run_cli("inspect", tmp_path / "deep.pt", "--data", tmp_path / "inputs.pt", "--html", report,
                           "--quiet", "--projections", "64")
    seconds = time.perf_counter() - start
    assert code == 0, err
    size = report.stat().st_size
    with capsys.disabled():
        print(f"\n200-layer inspect --html: {size / 1e6:.2f} MB in {seconds:.1f} s")
    assert size < SIZE_BUDGET_BYTES
    collected = parse(report.read_text(encoding="utf-8"))
    assert len(collected.images) == 2 + 3 * 200
