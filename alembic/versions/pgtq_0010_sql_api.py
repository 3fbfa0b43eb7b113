"""Enqueue from SQL: ``<schema>.defer_job(...)`` and ``<schema>.defer_jobs(jsonb)``.

Revision ID: pgtq_0010
Revises: pgtq_0009
Create Date: 2026-12-03

A frozen snapshot, like every pgtq revision: the DDL is written out here, never imported.

A stable, versioned SQL entry point for what is not Python: a trigger, a psql session, a
service in another language. It checks what ``defer`` checks (field by field, the error
naming the field, SQLSTATE 22023), inserts, and sends the NOTIFY pgtq's own insert sends
(``#<id>:<count> <queue>`` when due, ``@<seconds> <queue>`` when not), at commit, so a job
deferred in a transaction wakes the workers once it is visible. The signature is the API:
a later release adds parameters with defaults or a new function, never changes these.

- ``defer_job(task_name, args, queue, priority, run_at, lock, queueing_lock, on_conflict,
  concurrency_key, tags, meta, timeout, max_attempts) -> bigint``: one job, its id (with a
  ``queueing_lock`` and ``on_conflict => 'skip'``, the id of the job holding the key).
- ``defer_jobs(jobs jsonb) -> SETOF bigint``: an array of objects with the same keys, all or
  none, ids in order; one NOTIFY per queue.

``_defer_job_row`` is their shared, internal step (no NOTIFY): not part of the API.

Additive: functions only; workers of the previous release never call them.
"""

from collections.abc import Sequence

from alembic import op

from pgtq.migrations import revision_schema

revision: str = "pgtq_0010"
down_revision: str | Sequence[str] | None = "pgtq_0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: additive, safe while workers of the previous release run.
phase = "pre"

# The bounds of pgtq.validation, written out (a revision never imports them): names 255
# bytes, keys 1024, arguments 1 MB as JSON text, schedules from 2000 to ~100 years ahead.
ROW = """
CREATE OR REPLACE FUNCTION "{schema}"._defer_job_row(
    p_task_name text, p_args jsonb, p_queue text, p_priority integer, p_run_at timestamptz,
    p_lock text, p_queueing_lock text, p_on_conflict text, p_concurrency_key text,
    p_tags text[], p_meta jsonb, p_timeout double precision, p_max_attempts integer,
    p_where text, OUT o_id bigint, OUT o_fresh boolean
) LANGUAGE plpgsql AS $$
DECLARE
    field text;
    value text;
    attempt integer := 0;
BEGIN
    FOREACH field IN ARRAY ARRAY['task_name', 'queue'] LOOP
        value := CASE field WHEN 'task_name' THEN p_task_name ELSE p_queue END;
        IF value IS NULL OR value = '' THEN
            RAISE EXCEPTION '%: % must be a non-empty text', p_where, field
                USING ERRCODE = '22023';
        ELSIF octet_length(value) > 255 THEN
            RAISE EXCEPTION '%: %: at most 255 bytes (UTF-8), got %', p_where, field,
                octet_length(value) USING ERRCODE = '22023';
        END IF;
    END LOOP;
    FOREACH field IN ARRAY ARRAY['lock', 'queueing_lock', 'concurrency_key'] LOOP
        value := CASE field WHEN 'lock' THEN p_lock WHEN 'queueing_lock' THEN p_queueing_lock
                 ELSE p_concurrency_key END;
        IF value = '' THEN
            RAISE EXCEPTION '%: %: must not be empty', p_where, field USING ERRCODE = '22023';
        ELSIF octet_length(value) > 1024 THEN
            RAISE EXCEPTION '%: %: at most 1024 bytes (UTF-8), got %', p_where, field,
                octet_length(value) USING ERRCODE = '22023';
        END IF;
    END LOOP;
    IF p_args IS NULL OR jsonb_typeof(p_args) <> 'object' THEN
        RAISE EXCEPTION '%: args: must be a JSON object of keyword arguments, got %', p_where,
            coalesce(jsonb_typeof(p_args), 'NULL') USING ERRCODE = '22023';
    ELSIF octet_length(p_args::text) > 1000000 THEN
        RAISE EXCEPTION '%: args: at most 1000000 bytes as JSON', p_where
            USING ERRCODE = '22023';
    END IF;
    IF p_priority IS NULL THEN
        RAISE EXCEPTION '%: priority: must be an integer, got NULL', p_where
            USING ERRCODE = '22023';
    END IF;
    IF p_run_at IS NOT NULL AND (NOT isfinite(p_run_at) OR p_run_at < '2000-01-01 00:00+00'
            OR p_run_at > now() + interval '36525 days') THEN
        RAISE EXCEPTION '%: run_at: must be from 2000-01-01 to 100 years ahead, got %',
            p_where, p_run_at USING ERRCODE = '22023';
    END IF;
    IF p_on_conflict IS NULL OR p_on_conflict NOT IN ('raise', 'skip', 'replace') THEN
        RAISE EXCEPTION '%: on_conflict: must be raise, skip or replace, got %', p_where,
            coalesce(p_on_conflict, 'NULL') USING ERRCODE = '22023';
    ELSIF p_on_conflict <> 'raise' AND p_queueing_lock IS NULL THEN
        RAISE EXCEPTION '%: on_conflict: % needs a queueing_lock', p_where, p_on_conflict
            USING ERRCODE = '22023';
    END IF;
    IF p_tags IS NOT NULL AND (array_position(p_tags, NULL) IS NOT NULL
            OR array_position(p_tags, '') IS NOT NULL
            OR EXISTS (SELECT FROM unnest(p_tags) t WHERE octet_length(t) > 1024)) THEN
        RAISE EXCEPTION '%: tags: each must be a non-empty text of at most 1024 bytes', p_where
            USING ERRCODE = '22023';
    END IF;
    -- As configure(tags=...): repeats dropped (the first kept), at most 50, none is NULL.
    p_tags := (SELECT array_agg(t ORDER BY n) FROM (SELECT t, min(n) AS n
               FROM unnest(p_tags) WITH ORDINALITY AS u(t, n) GROUP BY t) AS d);
    IF cardinality(p_tags) > 50 THEN
        RAISE EXCEPTION '%: tags: at most 50, got %', p_where, cardinality(p_tags)
            USING ERRCODE = '22023';
    END IF;
    IF p_meta IS NOT NULL AND jsonb_typeof(p_meta) <> 'object' THEN
        RAISE EXCEPTION '%: meta: must be a JSON object, got %', p_where, jsonb_typeof(p_meta)
            USING ERRCODE = '22023';
    ELSIF octet_length(p_meta::text) > 1000000 THEN
        RAISE EXCEPTION '%: meta: at most 1000000 bytes as JSON', p_where
            USING ERRCODE = '22023';
    END IF;
    IF p_timeout IS NOT NULL AND NOT (p_timeout > 0 AND p_timeout < 'infinity') THEN
        RAISE EXCEPTION '%: timeout: must be > 0 seconds, got %', p_where, p_timeout
            USING ERRCODE = '22023';
    END IF;
    IF p_max_attempts IS NOT NULL AND p_max_attempts < 1 THEN
        RAISE EXCEPTION '%: max_attempts: must be at least 1, got %', p_where, p_max_attempts
            USING ERRCODE = '22023';
    END IF;

    IF p_queueing_lock IS NULL THEN
        INSERT INTO "{schema}".jobs AS j (task_name, args, queue, priority, scheduled_at, lock,
            concurrency_key, tags, meta, timeout, max_attempts)
        VALUES (p_task_name, p_args, p_queue, p_priority, p_run_at, p_lock,
            p_concurrency_key, p_tags, p_meta, p_timeout, p_max_attempts)
        RETURNING j.id INTO o_id;
        o_fresh := true;
        RETURN;
    END IF;
    LOOP  -- a key: the waiting job holding it wins, as configure(on_conflict=...) says
        attempt := attempt + 1;
        IF p_on_conflict = 'replace' THEN
            INSERT INTO "{schema}".jobs AS j (task_name, args, queue, priority, scheduled_at,
                lock, queueing_lock, concurrency_key, tags, meta, timeout, max_attempts)
            VALUES (p_task_name, p_args, p_queue, p_priority, p_run_at, p_lock,
                p_queueing_lock, p_concurrency_key, p_tags, p_meta, p_timeout, p_max_attempts)
            ON CONFLICT (queueing_lock) WHERE status = 'todo' AND queueing_lock IS NOT NULL
            DO UPDATE SET args = excluded.args, scheduled_at = excluded.scheduled_at,
                priority = excluded.priority
            WHERE j.task_name = excluded.task_name AND j.status = 'todo'
            RETURNING j.id, j.xmax = '0'::xid INTO o_id, o_fresh;
        ELSE
            INSERT INTO "{schema}".jobs AS j (task_name, args, queue, priority, scheduled_at,
                lock, queueing_lock, concurrency_key, tags, meta, timeout, max_attempts)
            VALUES (p_task_name, p_args, p_queue, p_priority, p_run_at, p_lock,
                p_queueing_lock, p_concurrency_key, p_tags, p_meta, p_timeout, p_max_attempts)
            ON CONFLICT (queueing_lock) WHERE status = 'todo' AND queueing_lock IS NOT NULL
            DO NOTHING
            RETURNING j.id, true INTO o_id, o_fresh;
        END IF;
        IF o_id IS NOT NULL THEN
            RETURN;
        END IF;
        -- Kept out: the holder, read in a new snapshot (it may have committed after ours).
        SELECT j.id INTO o_id FROM "{schema}".jobs AS j
        WHERE j.queueing_lock = p_queueing_lock AND j.status = 'todo';
        IF o_id IS NOT NULL AND p_on_conflict = 'skip' THEN
            o_fresh := false;
            RETURN;
        ELSIF o_id IS NOT NULL OR p_on_conflict = 'replace' OR attempt >= 3 THEN
            RAISE EXCEPTION '%: queueing_lock %: held by job %', p_where,
                quote_literal(p_queueing_lock), coalesce(o_id::text, '(another task''s)')
                USING ERRCODE = '23505',
                      HINT = CASE p_on_conflict WHEN 'raise'
                             THEN 'on_conflict => ''skip'' returns its id instead'
                             ELSE 'replace updates only a waiting job of the same task' END;
        END IF;
        -- The holder left the waiting state meanwhile: the key is free again, insert anew.
    END LOOP;
END;
$$
"""

# Written with op.execute, i.e. sa.text(): a colon before a name is escaped (``\\:1``).
ONE = """
CREATE OR REPLACE FUNCTION "{schema}".defer_job(
    task_name text, args jsonb DEFAULT '{{}}', queue text DEFAULT 'default',
    priority integer DEFAULT 0, run_at timestamptz DEFAULT NULL, lock text DEFAULT NULL,
    queueing_lock text DEFAULT NULL, on_conflict text DEFAULT 'raise',
    concurrency_key text DEFAULT NULL, tags text[] DEFAULT NULL, meta jsonb DEFAULT NULL,
    timeout double precision DEFAULT NULL, max_attempts integer DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    r := "{schema}"._defer_job_row($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                                  'defer_job');
    IF r.o_fresh THEN
        PERFORM pg_notify('pgtq_{schema}',
            CASE WHEN $5 IS NULL OR $5 <= now() THEN '#' || r.o_id || '\\:1 ' || $3
                 ELSE '@' || extract(epoch FROM $5 - now()) || ' ' || $3 END);
    END IF;
    RETURN r.o_id;
END;
$$
"""

MANY = """
CREATE OR REPLACE FUNCTION "{schema}".defer_jobs(jobs jsonb) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    job jsonb;
    n bigint;
    r record;
    unknown text;
    ids bigint[] := '{{}}';
    new_ids bigint[] := '{{}}';
    new_queues text[] := '{{}}';
    new_at timestamptz[] := '{{}}';
BEGIN
    IF jsonb_typeof(jobs) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'defer_jobs: jobs: must be a JSON array of objects, got %',
            coalesce(jsonb_typeof(jobs), 'NULL') USING ERRCODE = '22023';
    END IF;
    FOR job, n IN SELECT e.value, e.ordinality FROM jsonb_array_elements(jobs)
                  WITH ORDINALITY AS e LOOP
        IF jsonb_typeof(job) <> 'object' THEN
            RAISE EXCEPTION 'defer_jobs: item %: must be a JSON object, got %', n - 1,
                jsonb_typeof(job) USING ERRCODE = '22023';
        END IF;
        SELECT string_agg(k, ', ') INTO unknown FROM jsonb_object_keys(job) AS k
        WHERE k NOT IN ('task_name', 'args', 'queue', 'priority', 'run_at', 'lock',
                        'queueing_lock', 'on_conflict', 'concurrency_key', 'tags', 'meta',
                        'timeout', 'max_attempts');
        IF unknown IS NOT NULL THEN
            RAISE EXCEPTION 'defer_jobs: item %: unknown key(s) %', n - 1, unknown
                USING ERRCODE = '22023';
        END IF;
        BEGIN
        r := "{schema}"._defer_job_row(
            job ->> 'task_name', coalesce(job -> 'args', '{{}}'),
            coalesce(job ->> 'queue', 'default'), coalesce((job ->> 'priority')::integer, 0),
            (job ->> 'run_at')::timestamptz, job ->> 'lock', job ->> 'queueing_lock',
            coalesce(job ->> 'on_conflict', 'raise'), job ->> 'concurrency_key',
            CASE WHEN job ? 'tags' AND job -> 'tags' <> 'null'
                 THEN ARRAY(SELECT jsonb_array_elements_text(job -> 'tags')) END,
            job -> 'meta', (job ->> 'timeout')::double precision,
            (job ->> 'max_attempts')::integer, 'defer_jobs: item ' || (n - 1));
        EXCEPTION WHEN invalid_text_representation OR invalid_datetime_format
                    OR datetime_field_overflow OR numeric_value_out_of_range
                    OR invalid_parameter_value OR cannot_coerce THEN
            GET STACKED DIAGNOSTICS unknown = MESSAGE_TEXT;
            IF unknown LIKE 'defer_jobs: item %' THEN
                RAISE;  -- the row's own check, which names the field
            END IF;
            RAISE EXCEPTION 'defer_jobs: item %: a value of the wrong type: %', n - 1, unknown
                USING ERRCODE = '22023';
        END;
        ids := ids || r.o_id;
        IF r.o_fresh THEN
            new_ids := new_ids || r.o_id;
            new_queues := new_queues || coalesce(job ->> 'queue', 'default');
            new_at := new_at || (job ->> 'run_at')::timestamptz;
        END IF;
    END LOOP;
    -- One NOTIFY per queue: its due jobs named (first id, count), else its earliest schedule.
    PERFORM pg_notify('pgtq_{schema}',
        CASE WHEN count(*) FILTER (WHERE a.at IS NULL OR a.at <= now()) > 0
             THEN '#' || min(a.id) FILTER (WHERE a.at IS NULL OR a.at <= now()) || ':'
                  || count(*) FILTER (WHERE a.at IS NULL OR a.at <= now()) || ' ' || a.queue
             ELSE '@' || extract(epoch FROM min(a.at) - now()) || ' ' || a.queue END)
    FROM unnest(new_ids, new_queues, new_at) AS a(id, queue, at)
    GROUP BY a.queue;
    RETURN QUERY SELECT unnest(ids);
END;
$$
"""


def upgrade() -> None:
    schema = revision_schema()
    for function in (ROW, ONE, MANY):
        op.execute(function.format(schema=schema))


def downgrade() -> None:
    schema = revision_schema()
    op.execute(f'DROP FUNCTION IF EXISTS "{schema}".defer_jobs(jsonb)')
    op.execute(
        f'DROP FUNCTION IF EXISTS "{schema}".defer_job(text, jsonb, text, integer, timestamptz, '
        "text, text, text, text, text[], jsonb, double precision, integer)"
    )
    op.execute(
        f'DROP FUNCTION IF EXISTS "{schema}"._defer_job_row(text, jsonb, text, integer, '
        "timestamptz, text, text, text, text, text[], jsonb, double precision, integer, text)"
    )
