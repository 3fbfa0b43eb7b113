"""Fault injection: workers killed, paused and signalled, connections cut, PostgreSQL
restarted, many workers racing, and a state machine over the job statements."""
