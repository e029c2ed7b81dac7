"""`mtnlg serve`: an OpenAI-compatible HTTP server with continuous batching (see docs/serve.md)."""
