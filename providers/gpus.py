"""GPU model names as users write them ("A100", "4090") versus as providers list them
("A100 SXM4", "NVIDIA GeForce RTX 4090", "A100_PCIE"): one normal form and one match rule."""

from __future__ import annotations

import re

_NOISE = re.compile(r"\b(nvidia|geforce|tesla)\b")


def normalize_gpu(name: str) -> str:
    """"NVIDIA GeForce RTX 4090" → "rtx 4090"; "A100_SXM4" → "a100 sxm4"."""
    text = _NOISE.sub(" ", name.lower().replace("_", " ").replace("-", " "))
    return " ".join(text.split())


def gpu_matches(offered: str, wanted: str) -> bool:
    """True if the offered model is the wanted one or a variant of it ("A100" ⊇ "A100 SXM4 80GB")."""
    have, want = normalize_gpu(offered), normalize_gpu(wanted)
    if not want:
        return False
    if have == want or have.startswith(want + " "):
        return True
    # "4090" asks for "rtx 4090"; "H100" is not satisfied by "H100 NVL"? it is: a variant.
    words = have.split()
    return want in words or " ".join(words[1:]).startswith(want)


def any_gpu_matches(offered: str | None, wanted: list[str] | None) -> bool:
    return not wanted or (offered is not None and any(gpu_matches(offered, w) for w in wanted))
