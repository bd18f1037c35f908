"""Hosted model APIs as providers: usage-priced inference with no machine to rent.

Two adapters over plain httpx (no vendor SDKs): ``OpenAICompatibleProvider`` (registry type
``openai_api``) for anything speaking OpenAI's chat-completions dialect — OpenAI, OpenRouter,
Groq, Gemini's OpenAI-compatible endpoint, vLLM — and ``AnthropicProvider`` (type ``anthropic``)
for Anthropic's Messages API.

Config keys (both adapters unless noted):

- ``base_url``: API root. Defaults: ``https://api.openai.com/v1`` / ``https://api.anthropic.com``.
  OpenAI-compatible paths are appended to it (``/chat/completions``, ``/models``); Anthropic's
  carry ``/v1`` themselves (a trailing ``/v1`` on its base_url is dropped).
- ``api_key_env``: name of the environment variable holding the key (defaults ``OPENAI_API_KEY`` /
  ``ANTHROPIC_API_KEY``). Keys are read from the environment on every request and never logged,
  stored in results or put in error messages. ``null`` means the server needs no key (a local
  vLLM). A missing variable makes health not ok and offers empty.
- ``models``: model name (what jobs ask for in ``spec.model``) → ``{input_per_1k, output_per_1k,
  context_window?, upstream?, capabilities?}``: USD per 1K input/output tokens, the context size (jobs whose
  estimated prompt + max_tokens exceed it get no offer) and the id the API knows the model by
  (default: the name itself). A transcription model (OpenAI-compatible only, e.g. ``whisper-1``)
  is priced ``{per_minute}`` of audio instead. Required.
- ``region``: where offers say they run (default ``"global"``).
- ``timeout``: seconds to wait for one answer (default 120; capped by the job's timeout).
- ``max_concurrency``: requests in flight at once per worker process (default 8); offers advertise
  what is left as ``capacity``.
- ``kinds``: job kinds served (default ``["inference"]``; OpenAI-compatible APIs may add
  ``"transcription"``: the job's ``audio_url`` — http(s), a path, or an ``s3://`` input gpufleet
  presigned — is fetched and uploaded to ``/audio/transcriptions``; cost = audio minutes × ``per_minute``).
- ``default_cooldown_seconds``: how long to stop offering after a 429 without a usable
  ``Retry-After`` (default 30); ``max_cooldown_seconds`` caps any cooldown (default 900).
  402 (credits exhausted, e.g. OpenRouter) cools down the same way.
- ``health_ttl``: seconds a health answer is reused (default 30): placement asks before every job.
- ``headers``: extra non-secret headers for every request (e.g. OpenRouter's ``HTTP-Referer``).
- ``max_tokens_param`` (OpenAI-compatible): body field for the answer limit (default
  ``max_tokens``; OpenAI's reasoning models want ``max_completion_tokens``).
- ``anthropic_version`` (Anthropic): the ``anthropic-version`` header (default ``2023-06-01``).
- ``state_dir`` (set by the registry): where the cooldown deadline is shared between processes.

Results are ``{"text", "usage": {prompt_tokens, completion_tokens, total_tokens}, "model",
"finish_reason"}`` (finish reasons in OpenAI's vocabulary), and ``poll`` reports ``cost`` =
prompt_tokens × input_per_1k / 1000 + completion_tokens × output_per_1k / 1000. Transcription results
have the shape every transcription provider gives (``providers.transcription``): ``{"text", "language",
"duration_seconds", "segments": [{start, end, text}], "model", "usage"}`` plus ``"formats"`` with the
SRT/VTT the job's spec asks for.
"""

from providers.llm_api.anthropic import AnthropicProvider
from providers.llm_api.openai_compat import OpenAICompatibleProvider

__all__ = ["AnthropicProvider", "OpenAICompatibleProvider"]
