"""The dashboard's pages and actions: Starlette endpoints over the async operations API.

Reads go through ``app.jobs`` / ``app.queues`` / ``app.periodic``'s async twins (no SQL
here). GET never changes anything; every action is a POST that passes the read-only switch
and the CSRF check first, then redirects (303) to a page that shows what happened.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from pgtq.errors import UnknownSchedule
from pgtq.jobs import JobFilter, JobSelection, parse_statuses, running_progress
from pgtq.model import Job, Status
from pgtq.reports import COUNTED_STATUSES, NO_DATA, STALE_AFTER, duration
from pgtq.web.charts import throughput_svg, workflow_svg
from pgtq.web.security import LOOPBACK_HOSTS, Csrf, origin_allowed

if TYPE_CHECKING:
    from pgtq.app import App

__all__ = [
    "PAGE_SIZE",
    "BadRequest",
    "Dashboard",
    "job_filter",
    "job_id_of",
    "job_selection",
    "whole_number",
]


#: The largest job id (a bigint): a bigger number in a URL names no job.
MAX_ID = 2**63 - 1

#: Jobs per page of the jobs list.
PAGE_SIZE = 50
#: ``?refresh=N``: reload the page every N seconds, within these bounds.
REFRESH_MIN, REFRESH_MAX = 2, 3600
#: The longest queue name the pause and resume forms take, in UTF-8 bytes.
MAX_QUEUE_BYTES = 255
#: The overview's chart: the last hour, a bar a minute.
CHART_WINDOW, CHART_BUCKET = 3600.0, 60.0
#: The longest task name or periodic id the periodic actions take, in UTF-8 bytes.
MAX_SCHEDULE_BYTES = 1000

#: What a finished action says, by the code in the redirect (no user text is echoed back).
NOTICES = {
    "retried": "Job {id} is waiting again (todo).",
    "not-retried": "Job {id} was not retried: only failed, aborted or cancelled jobs can be.",
    "aborted": "Job {id}: abort requested (a waiting job is cancelled at once).",
    "not-aborted": "Job {id} had already ended: nothing to abort.",
    "cancelled": "Job {id} cancelled.",
    "not-cancelled": "Job {id} was not cancelled: only a waiting job can be (abort a running one).",
    "many-retried": "{n} job(s) retried: waiting again (todo).",
    "many-cancelled": "{n} job(s) cancelled.",
    "many-aborted": "{n} job(s) aborted: waiting ones cancelled, running ones asked to stop.",
    "many-deleted": "{n} job(s) deleted (a running job never is: abort it first).",
    "paused": "Queue paused: workers take none of its jobs until it is resumed.",
    "already-paused": "The queue was already paused.",
    "resumed": "Queue resumed.",
    "not-paused": "The queue was not paused.",
    "schedule-paused": "Schedule paused: no scheduler defers its ticks until it is resumed.",
    "schedule-already-paused": "The schedule was already paused.",
    "schedule-resumed": "Schedule resumed: the ticks it missed while paused are not deferred.",
    "schedule-not-paused": "The schedule was not paused.",
    "run-now": "Job {id} deferred now by its periodic schedule (run now).",
}

Endpoint = Callable[[Request], Awaitable[Response]]

RETRYABLE = frozenset({Status.FAILED, Status.ABORTED, Status.CANCELLED})

#: The controls the jobs list applies to the jobs ticked, or to every job its filter matches
#: (``app.jobs.<action>_many_async``), and what each did (the notice's code).
BULK_ACTIONS = {
    "retry": "many-retried",
    "cancel": "many-cancelled",
    "abort": "many-aborted",
    "delete": "many-deleted",
}
#: The most jobs one form may tick (a page shows :data:`PAGE_SIZE`).
MAX_TICKED = 1000


class BadRequest(Exception):
    """A request the dashboard cannot take as given: answered 400 with this message."""


def _shown(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")


def whole_number(value: str | None, name: str, *, low: int = 0, high: int = MAX_ID) -> int | None:
    """A number of the query string: None when absent or empty, else a whole number of ASCII
    digits from ``low`` to ``high``; anything else (``²``, ``-1``, ``1e3``, too big) raises
    :class:`BadRequest`. Every number a page reads goes through here."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    # At most as many digits as ``high``: int() never sees a 10k-digit string.
    digits = text.isascii() and text.isdigit() and len(text) <= len(str(high))
    if digits and low <= int(text) <= high:
        return int(text)
    raise BadRequest(f"{name} must be a whole number from {low} to {high}, got {_shown(value)}.")


def job_id_of(request: Request) -> int | None:
    """The job id of the URL's ``{job_id}``, or None when no job can have it (not a number,
    over a bigint): such a job does not exist (404)."""
    try:
        return whole_number(str(request.path_params["job_id"]), "a job id", low=1)
    except BadRequest:
        return None


def queue_name(value: object) -> str:
    """A queue name from a form: not empty, no NUL, at most :data:`MAX_QUEUE_BYTES` bytes."""
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("Which queue? The form has no queue name.")
    if "\x00" in value:
        raise BadRequest("A queue name cannot contain a NUL character.")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_QUEUE_BYTES:
        raise BadRequest(
            f"A queue name is at most {MAX_QUEUE_BYTES} bytes of UTF-8; this one is {size:,}."
        )
    return value


def _ago(seconds: float | None) -> str:
    return duration(seconds, decimals=0)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _since(value: datetime | None) -> str:
    if value is None:
        return ""
    return _ago(max(0.0, (datetime.now(UTC) - value).total_seconds())) + " ago"


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _json_line(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _percent(fraction: float) -> str:
    return f"{fraction:.0%}"


def _rate(value: float | None) -> str:
    return NO_DATA if value is None else f"{value:.2f}/s"


def templates() -> Jinja2Templates:
    """The page templates, from the package (they ship in the wheel), escaping everything."""
    env = Environment(
        loader=PackageLoader("pgtq.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=_ago, when=_when, since=_since, pretty=_json, json_line=_json_line)
    env.filters["rate"] = _rate
    env.filters["progress"] = running_progress
    env.filters["percent"] = _percent
    return Jinja2Templates(env=env)


#: The jobs page's query string: each parameter's key in :class:`~pgtq.jobs.JobFilter`.
FILTER_PARAMS = {"queue": "queue", "status": "status", "task": "task", "q": "search"}
#: ``?tag=a&tag=b``: the jobs having every one of these tags (``tags`` of the filter).
TAG_PARAM = "tag"
#: The most tags one filter may ask for.
MAX_TAGS = 20


def _text(value: object) -> str:
    # PostgreSQL text holds no NUL; an empty field filters nothing.
    return value.replace("\x00", "").strip() if isinstance(value, str) else ""


def job_selection(values: Mapping[str, Any]) -> JobSelection:
    """The jobs page's filters (:data:`FILTER_PARAMS`, :data:`TAG_PARAM`) in a query string or
    a form, checked: the jobs the page lists, and those "all matching" acts on (one status at
    most)."""
    found: dict[str, Any] = {}
    for param, key in FILTER_PARAMS.items():
        value = _text(values.get(param))
        if value:
            found[key] = value
    statuses = parse_statuses(found.get("status"))  # InvalidFilter: 400
    if statuses:
        found["status"] = statuses[0]
    getlist = getattr(values, "getlist", None)  # a query string or a form: repeated
    given = getlist(TAG_PARAM) if getlist is not None else [values.get(TAG_PARAM)]
    tags = list(dict.fromkeys(t for t in map(_text, given) if t))
    if len(tags) > MAX_TAGS:
        raise BadRequest(f"At most {MAX_TAGS} tags in a filter, got {len(tags)}.")
    if tags:
        found["tags"] = tags
    workflow = whole_number(_text(values.get("workflow")) or None, "workflow (an id)", low=1)
    if workflow is not None:
        found["workflow"] = workflow
    return cast(JobSelection, found)


def filter_fields(filters: JobSelection) -> list[tuple[str, str]]:
    """The filter as (parameter, value) pairs: the hidden fields of a form that acts on "all
    matching", and the query string of the page it asks for."""
    fields = [
        (param, str(getattr(value, "value", value)))
        for param, key in FILTER_PARAMS.items()
        if (value := filters.get(key)) is not None
    ]
    return fields + [(TAG_PARAM, t) for t in filters.get("tags") or ()]


def job_filter(request: Request) -> JobFilter:
    """The jobs page's query string, checked, as the filter of the page it asks for: one of
    :data:`PAGE_SIZE` jobs, newest first, after the ``after`` id (one status at most)."""
    found: dict[str, Any] = dict(job_selection(request.query_params))
    found["after"] = whole_number(request.query_params.get("after"), "after (a job id)")
    return cast(JobFilter, {**found, "limit": PAGE_SIZE, "newest_first": True})


def ticked_ids(values: Sequence[object]) -> list[int]:
    """The job ids ticked in the jobs list's form, each a whole number (else 400)."""
    if len(values) > MAX_TICKED:
        raise BadRequest(f"At most {MAX_TICKED} jobs can be ticked at once: use all matching.")
    ids = [whole_number(str(v), "a ticked job id", low=1) for v in values]
    return [i for i in ids if i is not None]


def query_string(filters: JobFilter, **changes: Any) -> str:
    """The query string of the page ``filters`` ask for, with ``changes`` (None drops one)."""
    values: dict[str, Any] = {param: filters.get(key) for param, key in FILTER_PARAMS.items()}
    values[TAG_PARAM] = list(filters.get("tags") or ()) or None
    values["after"] = filters.get("after")
    values["workflow"] = filters.get("workflow")
    values.update(changes)
    return urlencode({k: v for k, v in values.items() if v is not None}, doseq=True)


def form_text(value: object, what: str, *, empty: bool = False) -> str:
    """A task name or periodic id from a form: text, no NUL, at most
    :data:`MAX_SCHEDULE_BYTES` bytes (not empty unless ``empty``); else BadRequest."""
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise BadRequest(f"Which schedule? The form has no {what}.")
    if "\x00" in value:
        raise BadRequest(f"A {what} cannot contain a NUL character.")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_SCHEDULE_BYTES:
        raise BadRequest(f"A {what} is at most {MAX_SCHEDULE_BYTES} bytes of UTF-8.")
    return value


class Dashboard:
    """The endpoints, bound to one app."""

    def __init__(
        self,
        app: App,
        *,
        read_only: bool,
        csrf: Csrf,
        title: str | None,
        allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    ) -> None:
        self.app = app
        self.read_only = read_only
        self.csrf = csrf
        self.allowed_hosts = tuple(allowed_hosts)
        self.title = title or "pgtq"
        self.templates = templates()

    # -- rendering ---------------------------------------------------------------------------

    def base(self, request: Request) -> str:
        """Where the dashboard is mounted (``""`` at the root): every link starts with it."""
        return str(request.scope.get("root_path", "")).rstrip("/")

    def render(
        self, request: Request, name: str, context: dict[str, Any], status_code: int = 200
    ) -> Response:
        token, new = self.csrf.token_for(request)
        notice = NOTICES.get(request.query_params.get("notice", ""))
        try:
            refresh = self.refresh(request)
        except BadRequest:  # only an error page gets here with a bad one: it just won't reload
            refresh = None
        context = {
            "title": self.title,
            "base": self.base(request),
            "read_only": self.read_only,
            "csrf_field": self.csrf.FIELD,
            "csrf_token": token,
            "notice": self.notice(request, notice) if notice else None,
            "refresh": refresh,
            "statuses": list(Status),
            "Status": Status,
            **context,
        }
        response = self.templates.TemplateResponse(request, name, context, status_code=status_code)
        if new:
            self.csrf.set_cookie(request, response, token)
        return response

    def notice(self, request: Request, text: str) -> str:
        """The notice with its job id, or its count (``?n=``: a number, else left out)."""
        try:
            count = whole_number(request.query_params.get("n"), "n")
        except BadRequest:
            count = None
        return text.format(id=request.path_params.get("job_id"), n="?" if count is None else count)

    def refresh(self, request: Request) -> int | None:
        """``?refresh=N``: reload every N seconds (raises :class:`BadRequest` when out of range)."""
        return whole_number(
            request.query_params.get("refresh"), "refresh", low=REFRESH_MIN, high=REFRESH_MAX
        )

    def page(self, view: Endpoint) -> Endpoint:
        """A page's endpoint: its query string's common numbers checked before any read."""

        async def endpoint(request: Request) -> Response:
            self.refresh(request)
            return await view(request)

        return endpoint

    def no_job(self, request: Request) -> Response:
        job_id = job_id_of(request)
        shown = str(job_id) if job_id is not None else _shown(str(request.path_params["job_id"]))
        return self.error(request, 404, f"No job with id {shown}.")

    async def bad_request(self, request: Request, exc: Exception) -> Response:
        """A request that cannot be taken as given (a bad number, filter, queue name): 400."""
        return self.error(request, 400, str(exc) or type(exc).__name__)

    async def unavailable(self, request: Request, exc: Exception) -> Response:
        """pgtq's own errors (database unreachable, schema not migrated) as a page saying so:
        their messages say what to do, which a bare 500 would hide."""
        return self.error(request, 503, str(exc) or type(exc).__name__)

    def error(self, request: Request, status_code: int, message: str) -> Response:
        return self.render(
            request, "error.html", {"page": "", "message": message}, status_code=status_code
        )

    # -- pages -------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        stats = await self.app.queues.stats_async()  # every known queue, idle ones too
        throughput = await self.app.jobs.throughput_async(CHART_WINDOW, CHART_BUCKET)
        deepest = max((q.waiting for q in stats.queues.values()), default=0)
        return self.render(
            request,
            "overview.html",
            {
                "page": "overview",
                "stats": stats,
                "counted": COUNTED_STATUSES,
                "deepest": deepest,
                "throughput": throughput,
                "chart": throughput_svg(throughput),
                "live_workers": len(stats.live_workers()),
            },
        )

    async def jobs(self, request: Request) -> Response:
        filters = job_filter(request)  # InvalidFilter, BadRequest: 400
        page = await self.app.jobs.list_async(**filters)
        more = len(page) == PAGE_SIZE
        return self.render(
            request,
            "jobs.html",
            {
                "page": "jobs",
                "jobs": page,
                "filters": filters,
                "next_query": query_string(filters, after=page[-1].id) if more else None,
                "first_query": query_string(filters, after=None) if filters.get("after") else None,
                "tasks": sorted(self.app.tasks),
                "queues": self.app.queues.declared(),
                "retryable": RETRYABLE,
                "bulk_actions": list(BULK_ACTIONS),
                # The list's filter, posted with the form: what "all matching" acts on.
                "filter_fields": filter_fields(filters),
                # A running job reports progress: offer to follow it (the page reloading).
                "live_query": (
                    query_string(filters, refresh=2)
                    if any(running_progress(job) for job in page)
                    else None
                ),
            },
        )

    async def job(self, request: Request) -> Response:
        job_id = job_id_of(request)
        job = await self.app.jobs.get_async(job_id) if job_id is not None else None
        if job_id is None or job is None:
            return self.no_job(request)
        events = await self.app.jobs.history_async(job_id)
        graph = None
        if job.workflow_id is not None:
            members = await self.app.jobs.list_async(workflow=job.workflow_id, limit=1000)
            edges = await self.app.jobs.workflow_edges_async(job.workflow_id)
            graph = workflow_svg(
                [(j.id, j.task_name, j.status) for j in members], edges, job.id, self.base(request)
            )
        return self.render(
            request,
            "job.html",
            {
                "page": "jobs",
                "job": job,
                "events": events,
                "graph": graph,
                "actions": self._job_actions(job),
                "live": job.status is Status.DOING,
            },
        )

    def _job_actions(self, job: Job) -> list[str]:
        if job.status in RETRYABLE:
            return ["retry"]
        if job.status in (Status.TODO, Status.BLOCKED):
            return ["cancel", "abort"]
        if job.status is Status.DOING and not job.abort_requested:
            return ["abort"]
        return []

    async def workers(self, request: Request) -> Response:
        stats = await self.app.jobs.stats_async()
        return self.render(
            request,
            "workers.html",
            {"page": "workers", "workers": stats.workers, "stale_after": STALE_AFTER},
        )

    async def periodic(self, request: Request) -> Response:
        schedules = await self.app.periodic.list_async()
        now = datetime.now(UTC)
        schedules.sort(key=lambda p: (p.next_tick is None, p.next_tick or now, p.task_name))
        return self.render(
            request, "periodic.html", {"page": "periodic", "schedules": schedules, "now": now}
        )

    # -- actions -----------------------------------------------------------------------------

    async def _refusal(self, request: Request) -> Response | None:
        """Why this POST may not act (read-only, posted from another site, bad CSRF token),
        or None."""
        if self.read_only:
            return self.error(request, 403, "This dashboard is read-only: it takes no action.")
        origin = request.headers.get("origin")
        if origin is not None and not origin_allowed(origin, self.allowed_hosts):
            return self.error(
                request,
                403,
                f"This form was posted from {_shown(origin, 80)}, which is not one of the "
                "dashboard's allowed hosts (pgtq web --allowed-host).",
            )
        form = await request.form()
        if not self.csrf.check(request, form.get(self.csrf.FIELD)):
            return self.error(
                request,
                403,
                "The form's CSRF token is missing or does not match: reload the page and "
                "try again.",
            )
        return None

    def job_action(self, action: str) -> Endpoint:
        """The endpoint of ``retry``, ``abort`` or ``cancel``."""

        async def endpoint(request: Request) -> Response:
            return await self._job_action(request, action)

        return endpoint

    def queue_action(self, action: str) -> Endpoint:
        """The endpoint of ``pause`` or ``resume``."""

        async def endpoint(request: Request) -> Response:
            return await self._queue_action(request, action)

        return endpoint

    def periodic_action(self, action: str) -> Endpoint:
        """The endpoint of ``pause``, ``resume`` or ``run-now`` of a periodic schedule."""

        async def endpoint(request: Request) -> Response:
            return await self._periodic_action(request, action)

        return endpoint

    async def _job_action(self, request: Request, action: str) -> Response:
        refused = await self._refusal(request)
        if refused is not None:
            return refused
        job_id = job_id_of(request)
        if job_id is None or await self.app.jobs.get_async(job_id) is None:
            return self.no_job(request)
        if action == "retry":
            done = await self.app.jobs.retry_async(job_id)
            notice = "retried" if done else "not-retried"
        elif action == "abort":
            done = await self.app.jobs.abort_async(job_id) is not None
            notice = "aborted" if done else "not-aborted"
        else:
            done = await self.app.jobs.cancel_async(job_id)
            notice = "cancelled" if done else "not-cancelled"
        target = f"{self.base(request)}/jobs/{job_id}?{urlencode({'notice': notice})}"
        return RedirectResponse(target, status_code=303)

    async def jobs_action(self, request: Request) -> Response:
        """The jobs list's form: ``action`` on the jobs ticked (``ids``), or on every job the
        list's filter matches (``scope=matching``), in one statement; back to the list,
        saying how many changed. Refused as every action is (:meth:`_refusal`)."""
        refused = await self._refusal(request)
        if refused is not None:
            return refused
        form = await request.form()
        action = form.get("action")
        if not isinstance(action, str) or action not in BULK_ACTIONS:
            raise BadRequest(f"Which action? Use one of {', '.join(BULK_ACTIONS)}.")
        selection = job_selection(form)  # InvalidFilter: 400
        many: dict[str, Any]
        if form.get("scope") == "matching":
            # Chosen on purpose: with no filter, every job the action takes.
            many = {**selection, "all": True}
        else:
            ids = ticked_ids(form.getlist("ids"))
            if not ids:
                raise BadRequest("No job ticked: tick some jobs, or choose all matching.")
            many = {"ids": ids}
        run = getattr(self.app.jobs, f"{action}_many_async")
        done: list[int] = await run(**many)
        query = query_string(
            cast(JobFilter, selection), notice=BULK_ACTIONS[action], n=len(done), after=None
        )
        return RedirectResponse(f"{self.base(request)}/jobs?{query}", status_code=303)

    async def _queue_action(self, request: Request, action: str) -> Response:
        refused = await self._refusal(request)
        if refused is not None:
            return refused
        form = await request.form()
        name = queue_name(form.get("queue"))  # BadRequest: 400
        if action == "pause":
            notice = "paused" if await self.app.queues.pause_async(name) else "already-paused"
        else:
            notice = "resumed" if await self.app.queues.resume_async(name) else "not-paused"
        return RedirectResponse(f"{self.base(request)}/?notice={notice}", status_code=303)

    async def _periodic_action(self, request: Request, action: str) -> Response:
        refused = await self._refusal(request)
        if refused is not None:
            return refused
        form = await request.form()
        task = form_text(form.get("task"), "task name")  # BadRequest: 400
        periodic_id = form_text(form.get("periodic_id", ""), "periodic id", empty=True)
        base, periodic = self.base(request), self.app.periodic
        try:
            if action == "run-now":
                job_id = await periodic.run_now_async(task, periodic_id=periodic_id)
                return RedirectResponse(f"{base}/jobs/{job_id}?notice=run-now", status_code=303)
            if action == "pause":
                done = await periodic.pause_async(task, periodic_id=periodic_id)
                notice = "schedule-paused" if done else "schedule-already-paused"
            else:
                done = await periodic.resume_async(task, periodic_id=periodic_id)
                notice = "schedule-resumed" if done else "schedule-not-paused"
        except UnknownSchedule as exc:
            return self.error(request, 404, str(exc))
        return RedirectResponse(f"{base}/periodic?notice={notice}", status_code=303)
