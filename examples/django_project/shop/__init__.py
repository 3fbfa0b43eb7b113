"""A small shop: orders confirmed by a task, on pgtq (docs/howto/django.md)."""
