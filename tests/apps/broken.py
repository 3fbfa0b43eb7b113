"""An app module that fails on import, as a typo in a user's module would."""

from __future__ import annotations

raise RuntimeError("this module is broken on purpose")
