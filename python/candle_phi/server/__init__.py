"""An OpenAI-compatible HTTP server for candle_phi (``pip install 'candle-phi[server]'``).

``python -m candle_phi serve --model phi3.gguf`` runs it; :func:`create_app` gives the ASGI
app to mount or to run under any ASGI server. Concurrent requests are batched by the engine.
"""

# Lazy (PEP 562), so that `candle-phi serve` without the extra can say what to install.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from candle_phi.server.app import create_app
    from candle_phi.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]

if not TYPE_CHECKING:

    def __getattr__(name):
        if name == "create_app":
            from candle_phi.server.app import create_app

            return create_app
        if name == "ServerSettings":
            from candle_phi.server.settings import ServerSettings

            return ServerSettings
        raise AttributeError(f"module 'candle_phi.server' has no attribute {name!r}")
