"""`compress report`: cached evaluations, tables with deltas, figures, provenance, bad input;
`compress publish`: reports/index.* from results files; the HTML rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from conftest import make_llama
from helpers import cli

REPO = Path(__file__).resolve().parents[1]
FAST = ["--texts", "wiki", "--windows", "3", "--window-len", "64"]


@pytest.fixture(scope="module")
def candidates(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rep")
    out = {}
    for name, args in {"w4": ["--bits", "4", "--group-size", "32"], "w8": ["--bits", "8", "--group-size", "-1"]}.items():
        out[name] = root / name
        assert cli("quantize", tiny_llama, "-o", out[name], *args).exit_code == 0
    out["packed"] = root / "packed"
    assert cli("pack", out["w4"], "-o", out["packed"]).exit_code == 0
    return out


def test_report_tables_figures_provenance_and_cache(tiny_llama, candidates, fake_wiki, tmp_path):
    args = ["report", candidates["w4"], candidates["w8"], candidates["packed"], "--base", tiny_llama, *FAST]
    r = cli("--json", *args, "-o", tmp_path / "r1")
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)
    assert first["evaluated"] == 4 and first["cached"] == 0  # the base and three candidates
    md = (tmp_path / "r1" / "report.md").read_text()
    assert "### Perplexity, held-out Wikipedia" in md and "| **" in md and "Δ vs base" in md
    assert "method: rtn" in md and "command: compress" in md and "kind: packed" in md
    html = (tmp_path / "r1" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "http" not in html.replace("http-equiv", "")
    data = json.loads((tmp_path / "r1" / "report.json").read_text())
    w4 = next(row for row in data["rows"] if row["ref"] == str(candidates["w4"]))
    packed = next(row for row in data["rows"] if row["ref"] == str(candidates["packed"]))
    # a lossless pack of w4 evaluates identically to w4
    assert packed["result"]["texts"]["wiki"] == w4["result"]["texts"]["wiki"]
    assert "relative weight error" in w4["result"]["layers"]
    # again, with one new candidate: only that one is evaluated
    w3 = tmp_path / "w3"
    assert cli("quantize", tiny_llama, "-o", w3, "--bits", "3", "--group-size", "32").exit_code == 0
    # the shape `compress bench --json` prints (its "artifact" key is the artifact's run)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "cpu", "artifact": {"ref": str(candidates["w8"]), "rows": []},
                                 "base": {"rows": []}, "speedup": [{"batch": 1, "prefill_x": 0.5, "decode_x": 1.25}]}))
    r = cli("--json", *args[:4], w3, *args[4:], "-o", tmp_path / "r2", "--bench", bench)
    assert r.exit_code == 0, r.output
    second = json.loads(r.stdout)
    assert (second["evaluated"], second["cached"]) == (1, 4)
    md = (tmp_path / "r2" / "report.md").read_text()
    assert md.count("| w3 |") >= 3
    assert "### decode speed-up vs dense, batch 1 (cpu) (×) — higher is better" in md and "| w8 | 1.25 |" in md


def test_damaged_artifact_is_named_and_the_others_reported(tiny_llama, candidates, fake_wiki, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(candidates["w4"], broken)
    f = broken / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-7] ^= 0xFF
    f.write_bytes(bytes(data))
    r = cli("-q", "report", candidates["w8"], broken, "--base", tiny_llama, *FAST, "-o", tmp_path / "r")
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "broken" in r.stderr and "corrupted" in r.stderr
    md = (tmp_path / "r" / "report.md").read_text()
    assert "**Not reported:**" in md and "| w8 |" in md


def test_mixed_base_models_refused_unless_allowed(tiny_llama, candidates, fake_wiki, tmp_path):
    other = make_llama(tmp_path / "other", layers=3, seed=5)
    q = tmp_path / "q-other"
    assert cli("quantize", other, "-o", q, "--bits", "4", "--group-size", "32").exit_code == 0
    r = cli("-q", "report", candidates["w8"], q, "--base", tiny_llama, *FAST, "-o", tmp_path / "r")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "different base model" in r.stderr and "--allow-mixed-base" in r.stderr
    assert not (tmp_path / "r").exists()
    r = cli("report", candidates["w8"], q, "--base", tiny_llama, *FAST, "-o", tmp_path / "r", "--allow-mixed-base")
    assert r.exit_code == 0, r.output
    assert "different base model" in (tmp_path / "r" / "report.md").read_text()


def test_publish_index_from_results(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    rows = [{"model": "m", "method": "fp32", "config": {}, "ppl": 10.0, "kl": 0.0, "bits_per_weight": 32},
            {"model": "m", "method": "rtn", "config": {"bits": 4}, "ppl": 12.5, "kl": 0.2, "bits_per_weight": 4.3,
             "size_bytes": 2_000_000},
            {"model": "m", "method": "copy", "gbps": 3000.0}]
    (results / "q.json").write_text(json.dumps({"benchmark": "q", "device": "cpu", "rows": rows}))
    r = cli("--json", "publish", results, "-o", tmp_path / "reports")
    assert r.exit_code == 0, r.output
    md = (tmp_path / "reports" / "index.md").read_text()
    assert "| rtn (bits=4) | 12.500 | +2.500 | +25.0% |" in md and "copy" not in md
    assert (tmp_path / "reports" / "index.html").is_file()


def test_committed_index_is_regenerated_from_committed_results(tmp_path):
    """reports/index.md is exactly what `compress publish` writes from benchmarks/results."""
    r = cli("publish", REPO / "benchmarks" / "results", "-o", tmp_path)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "index.md").read_text() == (REPO / "reports" / "index.md").read_text()


# ---------------------------------------------------------------- a real browser

def _chrome():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def check_in_browser(html: Path, screenshot: Path | None = None) -> dict:
    """Open the report offline in headless Chromium: tables present, every image decoded."""
    driver = _chrome()
    try:
        driver.get(html.resolve().as_uri())
        for _ in range(50):
            if driver.execute_script("return document.readyState") == "complete":
                break
            time.sleep(0.1)
        state = driver.execute_script("""
            const imgs = [...document.images];
            return {title: document.title, tables: document.querySelectorAll('table.metric').length,
                    rows: document.querySelectorAll('table.metric tbody tr').length,
                    images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,
                    external: [...document.querySelectorAll('[src],[href]')].map(e => e.src || e.href)
                              .filter(u => !u.startsWith('data:')).length};""")
        if screenshot is not None:
            height = driver.execute_script("return document.body.scrollHeight")
            driver.set_window_size(1200, min(height + 40, 6000))
            driver.save_screenshot(str(screenshot))
        return state
    finally:
        driver.quit()


def _browser_available() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "chromium/chromedriver not installed (apt-get install chromium chromium-driver)"
    return None


@pytest.mark.skipif(_browser_available() is not None, reason=str(_browser_available()))
def test_report_renders_in_headless_chromium(tiny_llama, candidates, fake_wiki, tmp_path):
    r = cli("report", candidates["w4"], candidates["w8"], "--base", tiny_llama, *FAST, "-o", tmp_path / "r")
    assert r.exit_code == 0, r.output
    state = check_in_browser(tmp_path / "r" / "report.html", tmp_path / "shot.png")
    assert state["title"].startswith("Compression report")
    assert state["tables"] >= 4 and state["rows"] >= 12
    assert state["images"] >= 2 and state["broken"] == 0 and state["external"] == 0
    assert (tmp_path / "shot.png").stat().st_size > 10_000


@pytest.mark.skipif(_browser_available() is not None, reason=str(_browser_available()))
def test_published_index_renders_in_headless_chromium():
    state = check_in_browser(REPO / "reports" / "index.html")
    assert state["tables"] >= 10 and state["images"] >= 4 and state["broken"] == 0 and state["external"] == 0
