"""The overview's throughput chart as inline SVG, drawn on the server.

Pure (a :class:`~pgtq.reports.Throughput` in, markup out): no JavaScript, no CDN, nothing for
the browser to fetch, and a test can read the bars.
"""

from __future__ import annotations

from markupsafe import Markup

from pgtq.model import Status
from pgtq.reports import Throughput, ThroughputBucket

__all__ = ["throughput_svg"]

#: Stacked bottom to top, with their colours; cancelled jobs never ran and are not counted.
SERIES: tuple[tuple[str, tuple[Status, ...], str], ...] = (
    ("succeeded", (Status.SUCCEEDED,), "#2e7d32"),
    ("failed", (Status.FAILED,), "#c62828"),
    ("aborted", (Status.ABORTED,), "#ef8f00"),
)
LEFT, BOTTOM, TOP = 40, 20, 8


def _label(bucket: ThroughputBucket) -> str:
    parts = [f"{bucket.start:%H:%M} UTC: {bucket.total} job(s)"]
    for name, statuses, _ in SERIES:
        n = sum(bucket.counts.get(s, 0) for s in statuses)
        if n:
            parts.append(f"{n} {name}")
    return ", ".join(parts)


def throughput_svg(throughput: Throughput, width: int = 1120, height: int = 180) -> Markup:
    """Stacked bars, one per bucket (oldest left), with a tooltip each and a time axis."""
    buckets = throughput.buckets
    peak = max((b.total for b in buckets), default=0)
    plot_w, plot_h = width - LEFT - 4, height - BOTTOM - TOP
    step = plot_w / max(len(buckets), 1)
    bar_w = max(step - 1.0, 1.0)
    out = [
        Markup(
            '<svg class="chart" role="img" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
            'xmlns="http://www.w3.org/2000/svg" aria-label="{label}">'
        ).format(w=width, h=height, label=f"jobs ended per bucket, peak {peak}"),
        Markup(
            '<line x1="{x}" y1="{y}" x2="{x2}" y2="{y}" stroke="#999" stroke-width="1"/>'
        ).format(x=LEFT, y=TOP + plot_h, x2=LEFT + plot_w),
        Markup('<text x="{x}" y="{y}" class="axis" text-anchor="end">{n}</text>').format(
            x=LEFT - 4, y=TOP + 8, n=peak
        ),
        Markup('<text x="{x}" y="{y}" class="axis" text-anchor="end">0</text>').format(
            x=LEFT - 4, y=TOP + plot_h
        ),
    ]
    for i, bucket in enumerate(buckets):
        x = LEFT + i * step
        out.append(Markup('<g class="bar"><title>{}</title>').format(_label(bucket)))
        # An invisible full-height target, so even an empty minute shows its tooltip.
        out.append(
            Markup(
                '<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{h}" fill="transparent"/>'
            ).format(x=x, y=TOP, w=step, h=plot_h)
        )
        base = float(TOP + plot_h)
        for name, statuses, colour in SERIES:
            n = sum(bucket.counts.get(s, 0) for s in statuses)
            if not n or not peak:
                continue
            h = plot_h * n / peak
            base -= h
            out.append(
                Markup(
                    '<rect class="{name}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" '
                    'height="{h:.1f}" fill="{colour}"/>'
                ).format(name=name, x=x, y=base, w=bar_w, h=h, colour=colour)
            )
        out.append(Markup("</g>"))
        if bucket.start.minute % 15 == 0 and bucket.start.second == 0:
            out.append(
                Markup('<text x="{x:.1f}" y="{y}" class="axis">{t:%H:%M}</text>').format(
                    x=x, y=height - 5, t=bucket.start
                )
            )
    out.append(Markup("</svg>"))
    return Markup("").join(out)
