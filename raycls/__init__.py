"""raycls: distributed image classification on Ray (train, search, export, serve).

`serve run raycls.deploy` resolves module `raycls`, attribute `deploy`; it is looked up lazily
(PEP 562) so that `import raycls` stays light and imports neither Ray nor onnxruntime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["deploy"]


def __getattr__(name: str) -> Any:
    if name == "deploy":
        from raycls.serving import deploy

        return deploy
    raise AttributeError(f"module 'raycls' has no attribute {name!r}")
