"""A `Page` as Markdown (figures as PNG files beside it) and as one self-contained HTML file
(figures inline as data URIs, CSS inline, no script, nothing fetched at view time)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

from compressor.reporting import plots
from compressor.reporting.document import Page, Row, Section, delta, fmt


@dataclass
class Figure:
    name: str  # file name (safe: built from our own counters and slugs)
    title: str
    png: bytes


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"


def figures(page: Page) -> dict[int, list[Figure]]:
    """Every section's figures: its Pareto plots, then one heatmap per row and layer map."""
    out: dict[int, list[Figure]] = {}
    for i, section in enumerate(page.sections):
        figs = []
        keys = {m.key for m in section.present()}
        for x, y in section.pareto:
            if x in keys and y in keys:
                png = plots.pareto(section, section.metric(x), section.metric(y))
                if png:
                    figs.append(Figure(f"s{i}-pareto-{_slug(y)}-{_slug(x)}.png",
                                       f"{section.metric(y).label} vs {section.metric(x).label}", png))
        for j, row in enumerate(section.ok_rows()):
            for title, values in row.layers.items():
                png = plots.heatmap(f"{row.name}: {title}", values, title)
                if png:
                    figs.append(Figure(f"s{i}-r{j}-{_slug(title)}.png", f"{row.name}: {title}", png))
        out[i] = figs
    return out


def _cell(row: Row, section: Section, key: str) -> tuple[str, str, str]:
    m = section.metric(key)
    value = row.metrics.get(key)
    text = fmt(value, m.digits)
    if key in row.stderr and row.stderr[key] is not None:
        text += f" ± {fmt(row.stderr[key], m.digits)}"
    d, rel = delta(row, section.base, key)
    dtext = "" if d is None else f"{d:+.{m.digits}f}"
    rtext = "" if rel is None else f"{100 * rel:+.1f}%"
    return text, dtext, rtext


# ---------------------------------------------------------------- Markdown

def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(page: Page, figs: dict[int, list[Figure]], image_dir: str) -> str:
    lines = [f"# {page.title}", ""]
    for p in page.intro:
        lines += [p, ""]
    if page.errors:
        lines += ["**Not reported:**", ""] + [f"- `{_md_escape(n)}`: {_md_escape(e)}" for n, e in page.errors] + [""]
    for i, section in enumerate(page.sections):
        lines += [f"## {section.title}", ""]
        for p in section.intro:
            lines += [p, ""]
        rows = section.ok_rows()
        base = section.base
        for m in section.present():
            lines += [f"### {m.label}" + (f" ({m.unit})" if m.unit else "")
                      + {"lower": " — lower is better", "higher": " — higher is better"}.get(m.better or "", ""), ""]
            lines += ["| model | value | Δ vs base | Δ% |", "|---|---|---|---|"]
            for r in rows:
                if m.key not in r.metrics:
                    continue
                v, d, rel = _cell(r, section, m.key)
                name = f"**{_md_escape(r.name)}** (base)" if r is base else _md_escape(r.name)
                if r.flags:
                    name += " ⚠"
                lines.append(f"| {name} | {v} | {d} | {rel} |")
            lines.append("")
        for f in figs.get(i, []):
            lines += [f"![{_md_escape(f.title)}]({image_dir}/{f.name})", ""]
        flagged = [r for r in rows if r.flags]
        if flagged:
            lines += ["**Flags:**", ""] + [f"- ⚠ `{_md_escape(r.name)}`: {_md_escape('; '.join(r.flags))}"
                                           for r in flagged] + [""]
        prov = [r for r in rows if r.provenance]
        if prov:
            lines += ["### Provenance", ""]
            for r in prov:
                lines.append(f"- **{_md_escape(r.name)}**: " + "; ".join(f"{k}: {_md_escape(v)}"
                                                                         for k, v in r.provenance.items()))
            lines.append("")
        for n in section.notes:
            lines += [n, ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#1d2329;padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #d0d7de;padding-bottom:.2rem}
h3{font-size:1rem;margin:1.2rem 0 .4rem}
table{border-collapse:collapse;margin:.3rem 0 1rem;font-size:.88rem;width:100%}
th,td{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f5f7}
tr.base td{font-weight:600;background:#fff8e6}td.better{color:#116329}td.worse{color:#a40e26}
.errors{background:#ffebe9;border:1px solid #ff818266;padding:.5rem 1rem;border-radius:6px}
.flag{color:#9a6700}figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eaeef2}
figcaption{font-size:.85rem;color:#57606a}dl{font-size:.85rem}dt{font-weight:600;margin-top:.5rem}
dd{margin-left:1rem;color:#3d444d}code{font-size:.85em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:0 1.5rem}
"""


def _direction(row: Row, section: Section, key: str) -> str:
    d, _ = delta(row, section.base, key)
    better = section.metric(key).better
    if d is None or d == 0 or better is None:
        return ""
    return "better" if (d < 0) == (better == "lower") else "worse"


def _inline(text: str) -> str:
    """Markdown-ish paragraphs: `code` and **bold** only, everything else escaped."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def to_html(page: Page, figs: dict[int, list[Figure]]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
             f"<title>{e(page.title)}</title><style>{CSS}</style></head><body>", f"<h1>{e(page.title)}</h1>"]
    parts += [f"<p>{_inline(p)}</p>" for p in page.intro]
    if page.errors:
        parts.append("<div class=\"errors\" id=\"errors\"><strong>Not reported:</strong><ul>"
                     + "".join(f"<li><code>{e(n)}</code>: {e(msg)}</li>" for n, msg in page.errors) + "</ul></div>")
    for i, section in enumerate(page.sections):
        parts.append(f"<section><h2>{e(section.title)}</h2>")
        parts += [f"<p>{_inline(p)}</p>" for p in section.intro]
        rows, base = section.ok_rows(), section.base
        parts.append("<div class=\"grid\">")
        for m in section.present():
            head = e(m.label) + (f" ({e(m.unit)})" if m.unit else "")
            hint = {"lower": "lower is better", "higher": "higher is better"}.get(m.better or "", "")
            parts.append(f"<div><h3>{head} <small>{hint}</small></h3><table class=\"metric\" "
                         f"data-metric=\"{e(m.key)}\"><thead><tr><th>model</th><th>value</th><th>Δ vs base</th>"
                         "<th>Δ%</th></tr></thead><tbody>")
            for r in rows:
                if m.key not in r.metrics:
                    continue
                v, d, rel = _cell(r, section, m.key)
                cls = _direction(r, section, m.key)
                flag = " <span class=\"flag\" title=\"flagged\">⚠</span>" if r.flags else ""
                tr = "<tr class=\"base\">" if r is base else "<tr>"
                parts.append(f"{tr}<td>{e(r.name)}{flag}</td><td>{e(v)}</td>"
                             f"<td class=\"{cls}\">{e(d)}</td><td class=\"{cls}\">{e(rel)}</td></tr>")
            parts.append("</tbody></table></div>")
        parts.append("</div>")
        for f in figs.get(i, []):
            data = base64.b64encode(f.png).decode()
            parts.append(f"<figure><img alt=\"{e(f.title)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{e(f.title)}</figcaption></figure>")
        flagged = [r for r in rows if r.flags]
        if flagged:
            parts.append("<h3>Flags</h3><ul>" + "".join(
                f"<li class=\"flag\"><code>{e(r.name)}</code>: {e('; '.join(r.flags))}</li>" for r in flagged) + "</ul>")
        prov = [r for r in rows if r.provenance]
        if prov:
            parts.append("<h3>Provenance</h3><dl>")
            for r in prov:
                parts.append(f"<dt>{e(r.name)}</dt>" + "".join(f"<dd><strong>{e(k)}</strong>: {e(v)}</dd>"
                                                                for k, v in r.provenance.items()))
            parts.append("</dl>")
        parts += [f"<p>{_inline(n)}</p>" for n in section.notes]
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write(page: Page, directory: Path, stem: str = "report") -> dict:
    """`stem.md` with figures under `stem_files/`, and the self-contained `stem.html`."""
    from compressor.util import write_atomic

    directory = Path(directory)
    figs = figures(page)
    image_dir = f"{stem}_files"
    (directory / image_dir).mkdir(parents=True, exist_ok=True)
    wanted = {f.name for fs in figs.values() for f in fs}
    for old in (directory / image_dir).glob("*.png"):
        if old.name not in wanted:
            old.unlink()
    for fs in figs.values():
        for f in fs:
            write_atomic(directory / image_dir / f.name, f.png)
    write_atomic(directory / f"{stem}.md", markdown(page, figs, image_dir).encode())
    write_atomic(directory / f"{stem}.html", to_html(page, figs).encode())
    return {"markdown": str(directory / f"{stem}.md"), "html": str(directory / f"{stem}.html"),
            "figures": sorted(wanted)}
