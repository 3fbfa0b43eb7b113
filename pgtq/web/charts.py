"""The overview's throughput chart as inline SVG, drawn on the server.

Pure (a :class:`~pgtq.reports.Throughput` in, markup out): no JavaScript, no CDN, nothing for
the browser to fetch, and a test can read the bars.
"""

from __future__ import annotations

from markupsafe import Markup, escape

from pgtq.model import Status
from pgtq.reports import Throughput, ThroughputBucket

__all__ = ["throughput_svg", "workflow_svg"]

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


#: A workflow graph's node colours by status.
STATUS_COLOURS: dict[Status, str] = {
    Status.BLOCKED: "#9e9e9e",
    Status.TODO: "#1565c0",
    Status.DOING: "#6a1b9a",
    Status.SUCCEEDED: "#2e7d32",
    Status.FAILED: "#c62828",
    Status.ABORTED: "#ef8f00",
    Status.CANCELLED: "#616161",
}
#: Past this many jobs the graph is not drawn (the jobs page lists them).
MAX_GRAPH_JOBS = 300
NODE_W, NODE_H, GAP_X, GAP_Y = 150, 34, 50, 14


def layers(ids: list[int], edges: list[tuple[int, int]]) -> dict[int, int]:
    """Each job's column: the longest path to it from a job with no parent here (pure)."""
    known = set(ids)
    parents: dict[int, list[int]] = {i: [] for i in ids}
    for parent, child in edges:
        if parent in known and child in known:
            parents[child].append(parent)
    depth: dict[int, int] = {}
    for job_id in sorted(ids):  # parents have smaller ids: one pass in id order suffices
        depth[job_id] = 1 + max((depth.get(p, 0) for p in parents[job_id]), default=-1)
    return depth


def workflow_svg(
    jobs: list[tuple[int, str, Status]], edges: list[tuple[int, int]], current: int, base: str
) -> Markup | None:
    """A workflow as a layered graph: one box per job (``(id, task, status)``) in the
    column of its depth, linking to its page, coloured by status, the ``current`` one
    outlined; an arrow per edge. None past :data:`MAX_GRAPH_JOBS` jobs."""
    if not jobs or len(jobs) > MAX_GRAPH_JOBS:
        return None
    depth = layers([j[0] for j in jobs], edges)
    rows: dict[int, int] = {}
    per_column: dict[int, int] = {}
    for job_id, _, _ in sorted(jobs):
        column = depth[job_id]
        rows[job_id] = per_column.get(column, 0)
        per_column[column] = rows[job_id] + 1
    width = (max(per_column) + 1) * (NODE_W + GAP_X) + 8
    height = max(per_column.values()) * (NODE_H + GAP_Y) + 8

    def at(job_id: int) -> tuple[float, float]:
        return 4 + depth[job_id] * (NODE_W + GAP_X), 4 + rows[job_id] * (NODE_H + GAP_Y)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="workflow" id="workflow-graph" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="workflow graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
        'fill="#757575"/></marker></defs>',
    ]
    for parent, child in edges:
        if parent not in depth or child not in depth:
            continue
        (x1, y1), (x2, y2) = at(parent), at(child)
        parts.append(
            f'<line class="edge" data-parent="{parent}" data-child="{child}" '
            f'x1="{x1 + NODE_W}" y1="{y1 + NODE_H / 2}" x2="{x2}" y2="{y2 + NODE_H / 2}" '
            'stroke="#757575" marker-end="url(#arrow)"/>'
        )
    for job_id, task, status in jobs:
        x, y = at(job_id)
        colour = STATUS_COLOURS.get(status, "#9e9e9e")
        outline = ' stroke="#000" stroke-width="3"' if job_id == current else ""
        label = escape(f"#{job_id} {task}")[:40]
        parts.append(
            f'<a href="{escape(base)}/jobs/{job_id}"><g class="node {status.value}" '
            f'data-job="{job_id}"><title>{escape(f"job {job_id} {task}: {status.value}")}'
            f'</title><rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="4" '
            f'fill="{colour}"{outline}/><text x="{x + 6}" y="{y + 14}" fill="#fff" '
            f'font-size="11">{label}</text><text x="{x + 6}" y="{y + 28}" fill="#fff" '
            f'font-size="10">{status.value}</text></g></a>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
