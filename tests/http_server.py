"""A real HTTP server on 127.0.0.1 that serves generated images and every kind of bad URL.

    with ImageServer() as server:
        server.image_url("cat-1")            # a generated JPEG (or .png)
        server.bad_urls()                   # kind -> URL, one per failure kind below

Only ever binds 127.0.0.1. Images come from a pluggable generator, `make_image(name, ext) ->
bytes`, so other tests (captioning, the demo's scenes of shapes) can serve their own pictures;
the default draws a deterministic coloured rectangle whose size depends on the name.

Bad cases, each a URL kind (`BAD_KINDS`): HTTP 404 and 500, a connection closed before any
response, a body cut short of its Content-Length, an HTML page, a truncated JPEG (sent whole,
with its true length), random bytes labelled image/jpeg, an image larger than a given area, a
PNG whose header claims 50000x50000 pixels (a decompression bomb of a few hundred bytes), a
redirect loop, a port where nothing listens, and URLs that are not http(s).

`gate`: URLs under /gated/ wait until `server.gate` is set (it is, by default); tests clear it
to hold a download mid-shard, and watch `server.gated_hits` to know the moment it is reached.
"""

from __future__ import annotations

import hashlib
import io
import socket
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from PIL import Image, ImageDraw

HOST = "127.0.0.1"
BAD_KINDS = ("http_404", "http_500", "dropped", "cut_short", "html", "truncated_jpeg", "corrupt", "huge",
             "bomb", "redirect_loop", "unreachable", "ftp_scheme", "file_scheme")
CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def default_image(name: str, ext: str) -> bytes:
    """A deterministic picture for a name: size 40-199 x 30-149 px, a background and a rectangle."""
    h = hashlib.sha256(name.encode()).digest()
    size = (40 + h[0] % 160, 30 + h[1] % 120)
    im = Image.new("RGB", size, (h[2], h[3], h[4]))
    ImageDraw.Draw(im).rectangle([size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4],
                                 fill=(h[5], h[6], h[7]))
    buf = io.BytesIO()
    im.save(buf, {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
    return buf.getvalue()


def png_bomb(width: int = 50000, height: int = 50000) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ImageServer:
    def __init__(self, make_image: Callable[[str, str], bytes] = default_image,
                 huge_size: tuple[int, int] = (3000, 2000)):
        self.make_image = make_image
        self.huge_size = huge_size
        self.gate = threading.Event()
        self.gate.set()
        self.gated_hits = 0
        self.gated_hit = threading.Event()
        self.requests: Counter = Counter()
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], bytes] = {}
        self._unreachable_port = closed_port()
        self._server = ThreadingHTTPServer((HOST, 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="image-server", daemon=True)

    # --- life -----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}"

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- URLs -----------------------------------------------------------------------------
    def image_url(self, name: str, ext: str = "jpg", gated: bool = False) -> str:
        return f"{self.base_url}/{'gated' if gated else 'img'}/{name}.{ext}"

    def image_bytes(self, name: str, ext: str = "jpg") -> bytes:
        with self._lock:
            if (name, ext) not in self._cache:
                self._cache[(name, ext)] = self.make_image(name, ext)
            return self._cache[(name, ext)]

    def bad_url(self, kind: str, tag: str = "") -> str:
        """A URL that fails in the named way; `tag` makes it distinct from others of its kind."""
        q = f"?t={tag}" if tag else ""
        paths = {"http_404": "/status/404", "http_500": "/status/500", "dropped": "/dropped",
                 "cut_short": "/cut-short.jpg", "html": "/page.html", "truncated_jpeg": "/truncated.jpg",
                 "corrupt": "/corrupt.jpg", "huge": "/huge.png", "bomb": "/bomb.png",
                 "redirect_loop": "/redirect-loop"}
        if kind in paths:
            return f"{self.base_url}{paths[kind]}{q}"
        if kind == "unreachable":
            return f"http://{HOST}:{self._unreachable_port}/image.jpg{q}"
        if kind == "ftp_scheme":
            return f"ftp://{HOST}/image.jpg{q}"
        if kind == "file_scheme":
            return f"file:///etc/hostname{q}"
        raise KeyError(kind)

    def bad_urls(self, tag: str = "") -> dict[str, str]:
        return {kind: self.bad_url(kind, tag) for kind in BAD_KINDS}

    # --- serving --------------------------------------------------------------------------
    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = urlsplit(self.path).path
                with server._lock:
                    server.requests[path] += 1
                if path.startswith(("/img/", "/gated/")):
                    if path.startswith("/gated/"):
                        with server._lock:
                            server.gated_hits += 1
                        server.gated_hit.set()
                        server.gate.wait()
                    name, _, ext = path.rsplit("/", 1)[1].rpartition(".")
                    if ext not in CONTENT_TYPES:
                        return self._send(404, b"unknown image type", "text/plain")
                    return self._send(200, server.image_bytes(name, ext), CONTENT_TYPES[ext])
                if path.startswith("/status/"):
                    code = int(path.rsplit("/", 1)[1])
                    return self._send(code, f"status {code}".encode(), "text/plain")
                if path == "/dropped":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if path == "/cut-short.jpg":
                    body = server.image_bytes("cut-short", "jpg")
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if path == "/page.html":
                    return self._send(200, b"<!doctype html><html><body>Not an image</body></html>", "text/html")
                if path == "/truncated.jpg":
                    body = server.image_bytes("truncated", "jpg")
                    return self._send(200, body[: len(body) // 2], "image/jpeg")
                if path == "/corrupt.jpg":
                    body = hashlib.sha256(b"corrupt").digest() * 64
                    return self._send(200, b"\xff\xd8\xff\xe0" + body, "image/jpeg")
                if path == "/huge.png":
                    with server._lock:
                        if ("huge", "png") not in server._cache:
                            buf = io.BytesIO()
                            Image.new("L", server.huge_size, 128).save(buf, "PNG")
                            server._cache[("huge", "png")] = buf.getvalue()
                    return self._send(200, server._cache[("huge", "png")], "image/png")
                if path == "/bomb.png":
                    return self._send(200, png_bomb(), "image/png")
                if path == "/redirect-loop":
                    return self._send(302, b"", "text/plain", {"Location": "/redirect-loop"})
                return self._send(404, b"not found", "text/plain")

        return Handler
