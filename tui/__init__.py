"""glmchat's terminal app: chat, adapter switching, before/after comparison, training panel.

The app talks to the model only through ``backend.service.ChatBackend``; see ``tui.app.load_backend``.
"""
