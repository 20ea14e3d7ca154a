"""Optional bearer API keys on every `/v1` and `/v2` route except health and readiness.

Keys live in a file, one a line (blank lines and `#` comments ignored), named by `api_key_file=`
or `$RAYCLS_API_KEY_FILE`. Only their SHA-256 digests are kept; a presented key is hashed and
compared with every digest by `hmac.compare_digest`, so neither the comparison nor the number of
keys tried leaks where a guess went wrong. Pure ASGI, no Ray: the guard is handed a function that
returns the current digests (the replica's), so it is unit-tested with a plain Starlette app.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Routes that stay open with keys on: liveness and readiness probes (load balancers, Kubernetes)
# and the upload page and API docs, which hold no data (the page asks for the key itself).
OPEN_PATHS = frozenset(
    {"/", "/healthz", "/readyz", "/docs", "/openapi.json", "/v2/health/live", "/v2/health/ready"}
)
_MODEL_READY = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$")


def read_keys(path: str) -> tuple[bytes, ...]:
    """SHA-256 digests of the keys in `path`; ValueError (a ServeConfigError) if none."""
    from raycls.serving.args import ServeConfigError

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ServeConfigError(f"api_key_file={path}: cannot be read ({e})") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ServeConfigError(f"api_key_file={path}: holds no key (one key a line)")
    short = [i for i, k in enumerate(keys) if len(k) < 16]
    if short:
        raise ServeConfigError(
            f"api_key_file={path}: {len(short)} key(s) are under 16 characters; use long random "
            "keys: `python -c 'import secrets; print(secrets.token_urlsafe())'`"
        )
    return tuple(hashlib.sha256(k.encode()).digest() for k in keys)


def key_allowed(authorization: str | None, digests: tuple[bytes, ...]) -> bool:
    """True when the `Authorization: Bearer KEY` header carries one of the keys."""
    if not authorization:
        return False
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return False
    presented = hashlib.sha256(key.strip().encode("utf-8", "replace")).digest()
    ok = False
    for d in digests:  # no early exit: the time does not depend on which key matched
        ok |= hmac.compare_digest(presented, d)
    return ok


def needs_key(path: str) -> bool:
    if path in OPEN_PATHS or _MODEL_READY.match(path):
        return False
    return path.startswith(("/v1", "/v2"))


class ApiKeyGuard:
    """ASGI middleware: 401 JSON for a protected route without a valid key (when keys are set).

    The error body is each API's own shape: `{"error": "..."}` under /v2, `{"error": {"code",
    "message"}}` under /v1.
    """

    def __init__(self, app: Any, digests: Callable[[], tuple[bytes, ...]] | None = None):
        self.app = app
        self.digests = digests or _replica_digests

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        digests = self.digests() if needs_key(path) else ()
        if not digests:
            return await self.app(scope, receive, send)
        auth = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                auth = value.decode("latin-1")
        if key_allowed(auth, digests):
            return await self.app(scope, receive, send)
        message = (
            "missing or wrong API key: send the header `Authorization: Bearer KEY`"
            if auth is None or not auth.lower().startswith("bearer ")
            else "wrong API key"
        )
        body: Any = (
            {"error": message}
            if path.startswith("/v2")
            else {"error": {"code": "unauthorized", "message": message}}
        )
        raw = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
            (b"www-authenticate", b'Bearer realm="raycls"'),
        ]})  # fmt: skip
        await send({"type": "http.response.body", "body": raw})


def route_path(scope: dict[str, Any]) -> str:
    """The path below the app's route prefix (Serve puts the prefix in root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _replica_digests() -> tuple[bytes, ...]:
    from ray import serve

    return getattr(serve.get_replica_context().servable_object, "api_key_digests", ())
