"""Serve a built browser on localhost with the standard library (the pages also open from disk)."""

from __future__ import annotations

import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from actlab.errors import ActlabError

__all__ = ["make_server", "serve"]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass


def make_server(folder: str | Path, port: int = 8000, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """An HTTP server for ``folder`` (a folder ``actlab browse`` wrote); ``port=0`` picks a free port
    (``server.server_address[1]``). Bound to ``host`` (localhost by default: nothing is exposed)."""
    folder = Path(folder)
    if not (folder / "index.html").is_file() or not (folder / "data").is_dir():
        raise ActlabError(f"{folder} is not a feature browser (no index.html and data/): build one with "
                          "`actlab browse MODEL --site SITE -o DIR`")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ActlabError(f"port must be an integer 0..65535, not {port!r}")
    handler = functools.partial(_Quiet, directory=str(folder.resolve()))
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise ActlabError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None


def serve(folder: str | Path, port: int = 8000, host: str = "127.0.0.1", *, announce=print) -> None:
    """Serve ``folder`` until interrupted (Ctrl-C)."""
    server = make_server(folder, port, host)
    announce(f"serving {folder} at http://{host}:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
