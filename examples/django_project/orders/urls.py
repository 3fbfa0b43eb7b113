from django.urls import path

from orders import views

urlpatterns = [
    path("orders", views.create_order),
    path("orders/async", views.create_order_async),
    path("tasks/<str:result_id>", views.task_status),
]
