"""``glmchat serve``: an OpenAI-compatible HTTP server on any ``service.ChatBackend``.

``app.create_app`` builds the FastAPI app (routes, key, streaming), ``schemas`` holds
the wire format, ``replies`` turns reply events into responses and server-sent events, ``runner``
binds and drains, ``cli`` is the command line. Imports no torch: the engine comes from the caller.
"""
