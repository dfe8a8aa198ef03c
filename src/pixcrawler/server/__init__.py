"""The reference PixCrawler API server (extra ``[server]``): wire contract v1 over a store.

Example::

    from pixcrawler.server import create_app, run_in_thread

    with run_in_thread(create_app(Path("store"), {"my-key": "default"})) as base_url:
        ...  # talk to base_url + "/api/v1/jobs"
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ..exceptions import MissingDependencyError

    raise MissingDependencyError(
        'the PixCrawler server needs FastAPI and uvicorn: pip install "pixcrawler-sdk[server]"'
    ) from exc

from .app import create_app
from .runner import run_in_thread, serve

__all__ = ["create_app", "run_in_thread", "serve"]
