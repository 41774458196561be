"""The development server (``broker serve``, ``broker demo``): Werkzeug's, with request logs that
leave out query strings, so codes and states never reach the log."""

from __future__ import annotations

from typing import Any

from werkzeug.serving import WSGIRequestHandler, run_simple


class QuietQueryRequestHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = self.path.split("?", 1)[0]
        self.log("info", '"%s %s" %s %s', self.command, path, code, size)


def serve(app: Any, host: str, port: int) -> None:
    run_simple(
        host, port, app, threaded=True, use_reloader=False, request_handler=QuietQueryRequestHandler
    )
