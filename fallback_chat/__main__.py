"""``python -m fallback_chat``: read ``FALLBACK_*`` settings, build the app, serve it with uvicorn.

A configuration error is printed as one line and exits with status 2, so Fly's logs show the cause
instead of a traceback in a restart loop.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from fallback_chat.app import create_app
from fallback_chat.settings import ConfigError, load_settings


def main() -> None:
    try:
        settings = load_settings()
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = create_app(settings)
    except (ConfigError, ValueError) as exc:
        print(f"fallback_chat: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                proxy_headers=True, forwarded_allow_ips="*", timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
