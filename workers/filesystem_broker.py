"""The embedded broker: kombu's filesystem transport with atomic writes.

kombu's own ``_put`` creates the message file and only then locks and writes it, while a
consumer may already have moved that file away and read it empty — a lost message and a
crashed consumer under load. Here a message is written under a hidden temporary name and
renamed into the queue folder in one step, so a consumer only ever sees complete files.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

SCHEME = "gpufleetfs"


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        # The leading dot keeps consumers from matching the file until it is complete.
        tmp = os.path.join(self.data_folder_out, f".{name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(str_to_bytes(dumps(payload)))
        os.replace(tmp, os.path.join(self.data_folder_out, name))


class Transport(filesystem.Transport):
    Channel = Channel
    driver_type = driver_name = SCHEME


TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"


def broker_url(url: str) -> str:
    """Route the user-facing ``filesystem://`` URL to this transport."""
    return SCHEME + url[len("filesystem"):] if url.startswith("filesystem://") else url
