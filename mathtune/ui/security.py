"""What keeps `mathtune ui` a page for its user only: access token, Host check, CSRF, uploads, typed paths.

The server runs on the user's machine and can start training processes and write files, so:

- Every request (page, API, event stream) carries the access token: once in the URL that
  `mathtune ui` prints (`?token=...`), which sets an HttpOnly, SameSite=Strict cookie and redirects to
  the same page without it; a missing or wrong token gets 403.
- The Host header must name this machine (localhost, an IP address, its host name): a page on
  another site whose DNS name is rebound to 127.0.0.1 sends its own name and is refused (403).
- Every state-changing request (POST) carries the CSRF token, in an X-CSRF-Token header (JavaScript;
  a header a cross-site form cannot set) or a `csrf` query parameter (plain HTML forms): 403 without.
- Uploads are capped in size and stored under a generated name; paths typed by the user are resolved
  and checked to be existing files (or folders) of the expected kind before anything uses them.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import socket
import uuid
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from mathtune.errors import MathtuneError

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
UPLOAD_SUFFIXES = (".json", ".jsonl")
MAX_UPLOAD_BYTES = 200 << 20


def new_token() -> str:
    return secrets.token_urlsafe(24)


def cookie_name(port: int) -> str:
    # Cookies are not kept apart by port: two servers on one machine need two names.
    return f"mathtune_ui_{port}"


def host_allowed(host_header: str, bind_host: str) -> bool:
    """localhost, any IP address literal (a DNS rebinding attack needs a name), this machine's names."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8765
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    names = {"localhost", bind_host.lower(), socket.gethostname().lower(), socket.getfqdn().lower()}
    return host in names or host.endswith(".localhost")


class Guard:
    """ASGI middleware applying the token, Host and CSRF rules to every HTTP request."""

    def __init__(self, app, token: str, csrf: str, port: int, bind_host: str):
        self.app, self.token, self.csrf, self.port, self.bind_host = app, token, csrf, port, bind_host

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        query = dict(pairs)
        if not host_allowed(headers.get("host", ""), self.bind_host):
            return await _refuse(send, "Host header not allowed: open the address mathtune ui printed.")
        cookie = SimpleCookie(headers.get("cookie", ""))
        name = cookie_name(self.port)
        from_cookie = cookie[name].value if name in cookie else ""
        if "token" in query and _same(query["token"], self.token) and scope["method"] == "GET":
            # First visit: keep the token in a cookie and drop it from the address bar and history.
            rest = urlencode([(k, v) for k, v in pairs if k != "token"])
            location = scope["path"] + (f"?{rest}" if rest else "")
            return await _redirect(send, location, f"{name}={self.token}; HttpOnly; SameSite=Strict; Path=/")
        if not _same(from_cookie, self.token):
            return await _refuse(send, "Missing or wrong access token: open the address (with ?token=...) that "
                                       "mathtune ui printed.")
        if scope["method"] not in SAFE_METHODS:
            given = headers.get("x-csrf-token") or query.get("csrf", "")
            if not _same(given, self.csrf):
                return await _refuse(send, "Missing or wrong CSRF token: reload the page and try again.")
        return await self.app(scope, receive, send)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


async def _refuse(send, text: str) -> None:
    await _respond(send, 403, text.encode(), [(b"content-type", b"text/plain; charset=utf-8")])


async def _redirect(send, location: str, cookie: str) -> None:
    await _respond(send, 303, b"", [(b"location", location.encode("latin-1")), (b"set-cookie", cookie.encode())])


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# Files from the user


class TooLarge(MathtuneError):
    pass


async def save_upload(upload, folder: Path, limit: int = MAX_UPLOAD_BYTES, declared: int | None = None) -> Path:
    """Store an uploaded JSON/JSONL file as folder/<random>.<suffix>; only the suffix of the client's
    name is used (checked against UPLOAD_SUFFIXES). Written aside and renamed when complete."""
    suffix = Path(upload.filename or "").suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise MathtuneError(f"{upload.filename!r}: expected a {' or '.join(UPLOAD_SUFFIXES)} file")
    if declared is not None and declared > limit:
        raise TooLarge(f"upload of {declared:,} bytes is over the limit of {limit:,} bytes")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{uuid.uuid4().hex}{suffix}"
    partial = target.with_name(target.name + ".partial")
    size = 0
    try:
        with partial.open("wb") as out:
            while chunk := await upload.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"upload is over the limit of {limit:,} bytes")
                out.write(chunk)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def uploaded_file(folder: Path, name: str) -> Path:
    """An earlier upload by its generated name (never a path): 32 hex digits and an allowed suffix."""
    stem, _, suffix = name.partition(".")
    path = folder / name
    if len(stem) != 32 or any(c not in "0123456789abcdef" for c in stem) or f".{suffix}" not in UPLOAD_SUFFIXES \
            or not path.is_file():
        raise MathtuneError(f"{name!r}: no such uploaded file")
    return path


def typed_data_file(text: str) -> Path:
    """A data file path typed by the user: resolved, an existing .json/.jsonl file."""
    path = _resolved(text)
    if not path.is_file() or path.suffix.lower() not in UPLOAD_SUFFIXES:
        raise MathtuneError(f"{path}: expected an existing {' or '.join(UPLOAD_SUFFIXES)} file")
    return path


def typed_model_path(text: str) -> Path:
    """A model path typed by the user: resolved, a .gguf file or a Transformers folder (config.json)."""
    path = _resolved(text)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise MathtuneError(f"{path}: expected a .gguf file or a Transformers model folder (with config.json)")


def _resolved(text: str) -> Path:
    text = text.strip().strip('"')
    if not text or "\x00" in text:
        raise MathtuneError("empty path")
    # Absolute and normalised ('..' removed) but links kept: LM Studio's folders often hold links to
    # model files, and the page shows the path the user chose.
    return Path(os.path.abspath(Path(text).expanduser()))
