"""Integrations with other frameworks, each an optional extra (``pgtq[django]``)."""
