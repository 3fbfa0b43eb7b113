"""Settings of the example project. The database is ``DATABASE_URL`` (a PostgreSQL URL),
else ``postgresql://postgres@127.0.0.1:5432/pgtq_django_example``."""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import unquote, urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "only-for-the-example")
DEBUG = True
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "pgtq.contrib.django",  # manage.py pgtq, pgtq's schema in migrate, the admin
    "orders",
]
if find_spec("django.tasks") is None:  # Django < 6: the django-tasks backport
    INSTALLED_APPS.append("django_tasks")

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "shop.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


def _database(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


DATABASES = {
    "default": _database(
        os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/pgtq_django_example")
    )
}

# Django's Tasks framework on pgtq: enqueue joins the view's transaction.
TASKS = {
    "default": {
        "BACKEND": "pgtq.contrib.django.PgtqBackend",
        "QUEUES": ["default", "emails"],
    }
}

# pgtq's own settings (all optional): which database, pgtq's schema, pgtq.App's options.
PGTQ = {"DATABASE": "default", "SCHEMA": "pgtq", "OPTIONS": {"max_connections": 5}}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
