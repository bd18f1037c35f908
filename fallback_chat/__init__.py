"""gpufleet's fallback chat service: a small, always-on OpenAI-compatible endpoint (a CPU model, or a
forwarder to an external API) that gpufleet registers as its last-resort ``openai_api`` provider.

Run it with ``python -m fallback_chat``; build the ASGI app with ``fallback_chat.app.create_app``.
Kept import-free so loading the package (or its settings) does not pull in FastAPI.
"""
