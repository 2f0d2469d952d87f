"""The `compress report` targets on the reference model: a report over 10 artifacts of smollm2-135m
regenerates in under 60 s once their evaluations are cached, and a new artifact adds exactly
one evaluation. Writes benchmarks/results/report.json and the reference report under
reports/reference/ (report.md, report.html, figures, and a headless-Chromium screenshot).

    python benchmarks/report.py [--windows 8] [--work out/report-bench] [--render-only]

`--render-only` re-renders reports/reference/ from the evaluations cached by the last full run
(no timings are written).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import compress_json, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = {
    "rtn-w4g64": ["quantize", "smollm2-135m", "--bits", "4", "--group-size", "64", "--asym"],
    "rtn-w4g64-sym": ["quantize", "smollm2-135m", "--bits", "4", "--group-size", "64", "--sym"],
    "rtn-w4g32": ["quantize", "smollm2-135m", "--bits", "4", "--group-size", "32", "--asym"],
    "rtn-w3g64": ["quantize", "smollm2-135m", "--bits", "3", "--group-size", "64", "--asym"],
    "rtn-w8": ["quantize", "smollm2-135m", "--bits", "8", "--group-size", "-1"],
    "rtn-w2g32": ["quantize", "smollm2-135m", "--bits", "2", "--group-size", "32", "--asym"],
    "fp8-dynamic": ["quantize", "smollm2-135m", "--method", "fp8"],
    "bf16.packed": ["pack", "smollm2-135m", "--dtype", "bfloat16"],
    "rtn-w4g64.packed": ["pack", "{work}/rtn-w4g64"],
}
NEW = ("rtn-w3g32", ["quantize", "smollm2-135m", "--bits", "3", "--group-size", "32", "--asym"])


def build(work: Path, name: str, args: list[str]) -> Path:
    out = work / name
    if not (out / "manifest.json").is_file():
        compress_json(*[a.format(work=work) for a in args], "-o", str(out), "--overwrite")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "report-bench")
    parser.add_argument("--render-only", action="store_true", help="re-render the reference report from the cache")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    from compressor.models import assets

    gguf = assets.locate(assets.MODEL_ASSETS["smollm2-135m"].parts[0])
    paths = [str(build(work, name, a)) for name, a in ARTIFACTS.items()] + [str(gguf)]
    assert len(paths) == 10
    cache = work / "cache"  # kept, so --render-only re-renders from it
    common = ["--base", "smollm2-135m", "--windows", str(args.windows), "--cache", str(cache), "--overwrite"]
    if args.render_only:
        compress_json("report", *paths, *common, "-o", str(work / "r-warm"))
        publish_reference(work)
        return
    shutil.rmtree(cache, ignore_errors=True)  # the first run starts cold
    rows = []
    cold = compress_json("report", *paths, *common, "-o", str(work / "r-cold"))
    rows.append({"run": "cold cache", "artifacts": 10, **{k: cold[k] for k in ("evaluated", "cached", "wall_s")},
                 "process_wall_s": cold["process_wall_s"]})
    warm = compress_json("report", *paths, *common, "-o", str(work / "r-warm"))
    rows.append({"run": "all cached", "artifacts": 10, **{k: warm[k] for k in ("evaluated", "cached", "wall_s")},
                 "process_wall_s": warm["process_wall_s"]})
    new = str(build(work, *NEW))
    plus = compress_json("report", *paths, new, *common, "-o", str(work / "r-plus"))
    rows.append({"run": "one new artifact", "artifacts": 11, **{k: plus[k] for k in ("evaluated", "cached", "wall_s")},
                 "process_wall_s": plus["process_wall_s"]})
    write_results("report", rows, {"texts": ["wiki", "austen"], "eval_windows": args.windows, "window": 512},
                  {"target": "10 artifacts, evaluations cached: under 60 s (process_wall_s)"})
    print(rows)
    publish_reference(work)


def publish_reference(work: Path) -> None:
    """The all-cached report of the 10 artifacts as reports/reference/, with a screenshot taken in
    headless Chromium (the same check the tests make: tables present, every image decoded)."""
    reference = REPO / "reports" / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    shutil.copytree(work / "r-warm", reference)
    (reference / "report.json").unlink()  # machine-specific paths and timings
    sys.path.insert(0, str(REPO / "tests"))
    from test_report import check_in_browser

    state = check_in_browser(reference / "report.html", reference / "report.png")
    assert state["broken"] == 0 and state["external"] == 0, state
    print(state)


if __name__ == "__main__":
    main()
