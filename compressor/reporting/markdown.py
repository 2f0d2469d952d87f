"""Small Markdown reports of evaluation results."""

from __future__ import annotations

from pathlib import Path

from compressor.util import human_bytes


def write_eval_report(path: Path, result: dict, info: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Evaluation of `{result['model']}`",
        "",
        f"Held-out text `{result['data']['source']}`: {result['windows']} windows × {result['window_len']} tokens "
        f"({result['tokens']} predicted tokens, no BOS), data sha256 `{result['data']['sha256'][:16]}`.",
        "",
        "| model | method | bits/weight | size | perplexity | KL to base |",
        "|---|---|---|---|---|---|",
    ]
    method = (info.get("method") or {}).get("name", "-")
    config = (info.get("method") or {}).get("config", {})
    settings = ", ".join(f"{k}={v}" for k, v in config.items())
    bpw = info.get("bits_per_weight_linears") or info.get("bits_per_weight_file")
    if result.get("base"):
        lines.append(f"| `{result['base']}` (base) | - | - | - | {result['base_ppl']:.3f} | 0 |")
    kl = f"{result['kl']:.4f}" if "kl" in result else "-"
    lines.append(f"| `{result['model']}` | {method} {settings} | {bpw} | {human_bytes(result['size_bytes'])} "
                 f"| {result['ppl']:.3f} | {kl} |")
    lines += ["", f"Wall time {result['wall_s']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB.", ""]
    path.write_text("\n".join(lines))
    return path
