"""The submission server: the challenge API (schemas), the generation engine, the winners' post-processing
policy, the FastAPI app and the serve stage. Heavy imports (torch, transformers) happen on first use."""

from __future__ import annotations

__all__ = ["create_app", "serve_stage", "Engine"]


def __getattr__(name: str):
    if name == "create_app":
        from birbal.serve.app import create_app

        return create_app
    if name == "serve_stage":
        from birbal.serve.stage import serve_stage

        return serve_stage
    if name == "Engine":
        from birbal.serve.engine import Engine

        return Engine
    raise AttributeError(name)
