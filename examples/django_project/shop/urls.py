"""The shop's URLs: the orders, and the admin (pgtq's jobs, workers and queues in it)."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("orders.urls")),
]
