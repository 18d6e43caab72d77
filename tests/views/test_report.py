"""`qkvflow report`: one self-contained HTML file, checked as text and in a real
headless Chromium (Debian's, driven by Playwright, which downloads no browser)."""

import html.parser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
DEMO = ["--src", "I love China <eos>", "--tgt", "<bos> 我 爱 中国"]


def report(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkvflow", "report", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.external = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for key, value in attrs:
            if key in ("src", "href") and value and value.startswith(("http:", "https:", "//")):
                self.external.append(value)


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    proc = report("toy-en-zh", "-o", out, *DEMO)
    assert proc.returncode == 0, proc.stderr
    return out


def test_the_report_is_one_file_with_every_part_and_nothing_from_the_network(demo_report):
    text = demo_report.read_text(encoding="utf-8")
    tags = _Tags()
    tags.feed(text)
    assert tags.external == [] and "<link" not in text  # no network: inline SVG, CSS and JS
    assert tags.tags.count("svg") >= 4  # layer, block and op diagrams, heatmaps
    assert tags.tags.count("script") == 2  # the node details (JSON) and the page's code
    for part in ('id="diagram"', 'id="provenance"', 'id="findings"', 'id="heatmaps"', 'id="stats"',
                 "encoder self-attention", "编码器", "中国"):
        assert part in text, part


def test_every_user_string_is_escaped(tmp_path):
    (tmp_path / "evil.toml").write_text('preset = "tiny"\nname = "<script>alert(1)</script> & \\"quotes\\""\n')
    out = tmp_path / "r.html"
    proc = report("evil.toml", "-o", out, "--src", "5 6", "--tgt", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text(encoding="utf-8")
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp;" in text
    tags = _Tags()
    tags.feed(text)
    assert tags.tags.count("script") == 2


def test_a_run_is_refused_for_a_model_with_errors_unless_asked(tmp_path):
    (tmp_path / "bad.toml").write_text('preset = "tiny"\nencoder_layers = -1\n')
    proc = report(tmp_path / "bad.toml", "-o", tmp_path / "r.html", "--src", "5", "--tgt", "1")
    assert proc.returncode == 2 and "--no-check" in proc.stderr and not (tmp_path / "r.html").exists()
    proc = report(tmp_path / "bad.toml", "-o", tmp_path / "r.html")  # no run: the findings are the report
    assert proc.returncode == 1 and "QKV103" in (tmp_path / "r.html").read_text(encoding="utf-8")


def _browser():
    if not Path(CHROMIUM).exists():
        return None
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        return None
    return CHROMIUM


@pytest.mark.skipif(_browser() is None and not os.environ.get("CI"),
                    reason="needs Debian's chromium and playwright (CI installs both)")
def test_the_report_in_headless_chromium(demo_report, tmp_path):
    from playwright.sync_api import sync_playwright
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: errors.append(f"request {r.url}") if not r.url.startswith(("file:", "data:"))
                else None)
        page.goto(demo_report.as_uri())
        assert page.locator(".pane.shown svg").count() == 1  # the layer-level diagram, shown
        assert page.locator(".pane").count() == 3  # layer, block and op level
        assert page.locator("#provenance .lang.shown tbody tr").count() == 3  # enc self, dec self, cross
        assert page.locator("#heatmaps svg").count() == 1 and page.locator("#stats tbody tr").count() > 100
        node = page.locator('.pane.shown g.node[id="decoder.layers.0.cross_attn"]')
        node.click()
        details = page.locator("#details").inner_text()
        assert "decoder.layers.0.cross_attn" in details and "cross" in details
        assert "K from" in details and "encoder" in details  # where its keys come from
        page.locator('.langs button[data-lang="zh"]').click()
        assert "交叉注意力" in page.locator("#provenance .lang.shown").inner_text()
        page.locator('.tab[data-level="op"]').click()
        page.locator('.pane.shown g.node[id="decoder.layers.0.cross_attn.k_proj"]').click()
        assert "param weight" in page.locator("#details").inner_text()
        page.locator('.tab[data-level="layer"]').click()
        page.locator('.pane.shown g.node[id="decoder.layers.0.cross_attn"]').click()
        # `make screenshot` keeps this picture as diagrams/report.png
        shot = Path(os.environ.get("QKVFLOW_SCREENSHOT") or tmp_path / "report.png")
        page.screenshot(path=str(shot))
        browser.close()
    assert errors == []
    assert shot.read_bytes()[:4] == b"\x89PNG"
