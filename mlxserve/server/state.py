"""Typed application state (``web.AppKey``), shared by every route module."""

from __future__ import annotations

from aiohttp import web

from mlxserve.server.config import Settings
from mlxserve.server.metrics import Metrics
from mlxserve.server.residency import ModelManager
from modelstore.store import ModelStore

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", ModelStore)
MANAGER = web.AppKey("manager", ModelManager)
METRICS = web.AppKey("metrics", Metrics)
