#!/usr/bin/env python3
"""Plots the soak's samples (tests/it/soak.rs) as an SVG, with no dependencies.

    python3 scripts/soak_plot.py target/soak/samples.csv docs/soak.svg

Top: resident memory of the processor and of the serving node (MB). Middle: impressions the
processor retains for attribution (the funnel's working set, thousands). Bottom: lag, records
produced but not yet committed. Dashed lines: SIGKILLs of the processor.
"""
import csv
import sys

W, H, PAD, GAP = 900, 720, 60, 50


def main(src, dst):
    rows = list(csv.DictReader(open(src)))
    if not rows:
        sys.exit("no samples")
    t = [float(r["seconds"]) / 60 for r in rows]
    proc = [int(r["processor_rss_bytes"]) / 1e6 for r in rows]
    node = [int(r["node_rss_bytes"]) / 1e6 for r in rows]
    lag = [max(0, int(r["produced"]) - int(r["committed"])) for r in rows]
    retained = [max(0, int(r.get("retained_impressions") or 0)) / 1e3 for r in rows]
    kills = [t[i] for i in range(1, len(rows)) if rows[i]["kills"] != rows[i - 1]["kills"]]
    ph = (H - 2 * PAD - 2 * GAP) / 3
    x0, x1 = PAD, W - 20
    tmax = max(t) or 1

    def x(v):
        return x0 + (x1 - x0) * v / tmax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>']

    def panel(top, title, series, unit):
        vmax = max(max(s) for s, _, _ in series) * 1.1 or 1
        out.append(f'<text x="{x0}" y="{top - 8}" font-weight="bold">{title}</text>')
        out.append(f'<rect x="{x0}" y="{top}" width="{x1 - x0}" height="{ph}" fill="none" stroke="#999"/>')
        for k in range(5):
            v = vmax * k / 4
            y = top + ph - ph * k / 4
            out.append(f'<text x="{x0 - 6}" y="{y + 4}" text-anchor="end">{v:,.0f}</text>')
            out.append(f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#eee"/>')
        for kt in kills:
            out.append(f'<line x1="{x(kt)}" y1="{top}" x2="{x(kt)}" y2="{top + ph}" stroke="#c33" stroke-dasharray="4 3"/>')
        for i, (s, color, label) in enumerate(series):
            pts = " ".join(f"{x(a):.1f},{top + ph - ph * b / vmax:.1f}" for a, b in zip(t, s))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            out.append(f'<text x="{x1 - 220 + 110 * i}" y="{top - 8}" fill="{color}">{label} ({unit})</text>')

    panel(PAD, "Resident memory", [(proc, "#1f77b4", "processor"), (node, "#2ca02c", "serving node")], "MB")
    panel(PAD + ph + GAP, "Impressions retained for attribution", [(retained, "#ff7f0e", "retained")], "thousands")
    panel(PAD + 2 * (ph + GAP), "Lag: records produced, not yet committed", [(lag, "#9467bd", "lag")], "records")
    for k in range(7):
        v = tmax * k / 6
        out.append(f'<text x="{x(v)}" y="{H - PAD + 28}" text-anchor="middle">{v:.0f} min</text>')
    out.append(f'<text x="{x1}" y="{H - 12}" text-anchor="end" fill="#c33">dashed: SIGKILL of the processor</text>')
    out.append("</svg>")
    open(dst, "w").write("\n".join(out) + "\n")
    print(f"wrote {dst}: {len(rows)} samples over {tmax:.1f} min, {len(kills)} kills")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
