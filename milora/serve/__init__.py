"""milora-serve: an OpenAI-compatible HTTP server over an export directory (docs/serving.md).

    from milora.serve import create_app, ServeConfig
    app = create_app("out/", config=ServeConfig(max_tokens_limit=1024), max_batch=8)

Needs the `serve` extra (fastapi, uvicorn, prometheus-client); like the runtime it imports
neither torch nor transformers. Scale-out on Ray Serve: milora.serve.ray_serve (`ray` extra).
"""

__all__ = ["create_app", "ServeConfig", "LocalBackend", "EngineDriver", "GenerateCall"]


def __getattr__(name):
    if name in ("create_app", "ServeConfig"):
        from milora.serve import app

        return getattr(app, name)
    if name == "LocalBackend":
        from milora.serve.backend import LocalBackend

        return LocalBackend
    if name in ("EngineDriver", "GenerateCall"):
        from milora.serve import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'milora.serve' has no attribute {name!r}")
