"""What a test does where a Debian package it needs is missing (chromium for the browser
test, pgbouncer for the PgBouncer suite): ``nox -s tests`` installs both where it can, and
says so first; ``PGTQ_NO_SYSTEM_INSTALL=1`` tells it not to."""

from __future__ import annotations

from collections.abc import Mapping

NO_SYSTEM_INSTALL = "PGTQ_NO_SYSTEM_INSTALL"


def without_package(
    package: str, path: str, tests: str, environ: Mapping[str, str]
) -> tuple[bool, str]:
    """(fail?, why) for ``tests`` where Debian's ``package`` is not at ``path``: they fail in
    CI, which must run them (.ci/run installs the package); elsewhere they skip, saying why
    and how to get it."""
    missing = f"Debian's {package} is not installed at {path}"
    if environ.get(NO_SYSTEM_INSTALL, "") not in ("", "0"):
        why = f"{missing} and {NO_SYSTEM_INSTALL} is set, so `nox -s tests` did not install it"
    else:
        why = (
            f"{missing} (`nox -s tests` installs it with apt-get where it can, unless "
            f"{NO_SYSTEM_INSTALL}=1)"
        )
    if environ.get("CI"):
        return True, f"{why}: CI must run {tests}"  # never a silent skip there
    return False, why
