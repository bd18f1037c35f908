"""What every model-API adapter shares: config, offers, cooldown after 429s, in-flight counting,
the synchronous request, error mapping, poll and health. Subclasses only say how to talk to
their API (headers, paths, request and response shapes).

A model API is usage-priced capacity with no machine to rent: reserving is free, the job runs
inside ``start`` (one HTTP request, like the local provider) and ``poll`` reports the stored
answer with its cost computed from the API's own token counts.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx

from providers.base import (
    Health,
    JobSpec,
    Lease,
    NoCapacity,
    Offer,
    PermanentProviderError,
    Provider,
    ProviderError,
    ProviderKind,
    Requirements,
    RunHandle,
    RunStatus,
    TransientProviderError,
)
from providers.llm_api.cooldown import Cooldown, retry_after_seconds
from providers.llm_api.errors import api_message, scrub, status_error, transport_error
from providers.llm_api.prices import (
    ModelPrice,
    audio_cost,
    blended_per_1k,
    estimated_prompt_tokens,
    parse_models,
    usage_cost,
)

log = logging.getLogger(__name__)

Body = dict[str, Any]


class ModelAPIProvider(Provider, ABC):
    kind: ClassVar[ProviderKind] = ProviderKind.model_api
    default_base_url: ClassVar[str]
    default_key_env: ClassVar[str]
    # Path (under base_url) of the cheap authenticated GET used by health().
    health_path: ClassVar[str]
    supported_kinds: ClassVar[frozenset[str]] = frozenset({"inference"})

    def __init__(self, name: str, config: dict[str, Any] | None = None) -> None:
        super().__init__(name, config)
        cfg = self.config
        self.base_url = str(cfg.get("base_url") or self.default_base_url).rstrip("/")
        # api_key_env: null (or "") means the server wants no key, e.g. a self-hosted vLLM.
        key_env = cfg.get("api_key_env", self.default_key_env)
        self.key_env: str | None = str(key_env) if key_env else None
        self.models: dict[str, ModelPrice] = parse_models(cfg.get("models"))
        self.region = str(cfg.get("region", "global"))
        self.timeout = float(cfg.get("timeout", 120))
        self.max_concurrency = int(cfg.get("max_concurrency", 8))
        self.kinds: list[str] = [str(k) for k in cfg.get("kinds", ["inference"])]
        self.default_cooldown = float(cfg.get("default_cooldown_seconds", 30))
        self.max_cooldown = float(cfg.get("max_cooldown_seconds", 900))
        self.health_ttl = float(cfg.get("health_ttl", 30))
        self.extra_headers: dict[str, str] = {str(k): str(v) for k, v in (cfg.get("headers") or {}).items()}
        if self.timeout <= 0 or self.max_concurrency < 1:
            raise ValueError("timeout must be > 0 and max_concurrency >= 1")
        if unsupported := sorted(set(self.kinds) - self.supported_kinds):
            raise ValueError(f"kinds {unsupported} are not served by this adapter (supported: {sorted(self.supported_kinds)})")
        if "start_timeout" not in cfg:  # start() holds the whole request: the sweeper must outwait it
            self.start_timeout = max(self.start_timeout, self.timeout + 30)
        state_dir = cfg.get("state_dir")
        self.cooldown = Cooldown(Path(state_dir) / f"{name}-cooldown.json" if state_dir else None)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._client_pid = 0
        self._health: tuple[float, Health] | None = None

    # --- what subclasses define --------------------------------------------------------------

    @abstractmethod
    def auth_headers(self, key: str | None) -> dict[str, str]:
        ...

    @abstractmethod
    def chat_request(self, model: str, messages: list[dict[str, str]], spec: dict[str, Any]) -> tuple[str, Body]:
        """(path under base_url, JSON body) for one chat completion."""

    @abstractmethod
    def parse_chat(self, payload: Body, model: str) -> Body:
        """The normalized result: {text, usage: {prompt_tokens, completion_tokens, total_tokens}, model, finish_reason}."""

    def transcribe(self, model: str, spec: dict[str, Any], timeout: float) -> Body:
        """The uniform transcription result (``providers.transcription.transcription_result``): ``{text,
        language, duration_seconds, segments: [{start, end, text}], model, usage}`` plus ``formats`` (the
        SRT/VTT the spec asks for), so a job's result does not depend on which provider ran it. Only APIs
        with a transcription endpoint override this."""
        raise PermanentProviderError(f"{self.name}: this API does not transcribe audio")

    # --- Provider ----------------------------------------------------------------------------

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        if req.needs_gpu() or kind not in self.kinds or self._key_problem() or self.cooldown.remaining() > 0:
            return []
        wanted = spec.get("model")
        names = ([wanted] if wanted in self.models else []) if wanted else list(self.models)
        # A transcription model (priced per minute) serves transcription jobs only, a chat model the rest.
        names = [n for n in names if self.models[n].transcribes == (kind == "transcription")]
        capacity = max(0, self.max_concurrency - self._in_flight)
        needed = estimated_prompt_tokens(spec) + int(spec.get("max_tokens") or 0) if spec else 0
        offers = []
        for model in names:
            price = self.models[model]
            if price.context_window and not price.transcribes and needed > price.context_window:
                continue  # the API would refuse it; another provider's model may have room
            offers.append(Offer(provider=self.name, offer_id=model, region=self.region, price_per_hour=0.0,
                                price_per_1k_tokens=blended_per_1k(price, spec), capacity=capacity,
                                kinds=list(self.kinds), context_window=price.context_window,
                                capabilities=list(price.capabilities), data={"model": model}))
        return offers

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        if (left := self.cooldown.remaining()) > 0:
            raise NoCapacity(f"{self.name}: rate limited; cooling down {math.ceil(left)}s")
        return Lease(provider=self.name, offer_id=offer.offer_id, external_id=f"api-{uuid.uuid4()}", label=job.label,
                     price_per_hour=0.0, reserved_at=time.time(), data={"model": offer.data.get("model", offer.offer_id)})

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        if job.kind not in self.kinds:
            raise PermanentProviderError(f"{self.name}: does not run {job.kind} jobs")
        model = str(lease.data.get("model") or lease.offer_id)
        price = self.models.get(model)
        if price is None:
            raise TransientProviderError(f"{self.name}: model {model!r} is no longer configured")
        timeout = min(self.timeout, float(job.timeout_seconds))
        if job.kind == "transcription":
            with self._slot():
                result = self.transcribe(price.upstream or model, job.spec, timeout)
            result["model"] = model
            data: Body = {"response": result, "per_minute": price.per_minute}
            return RunHandle(provider=self.name, lease=lease, started_at=time.time(), data=data)
        path, body = self.chat_request(price.upstream or model, _messages(job.spec, self.name), job.spec)
        with self._slot():
            response = self._request("POST", path, body, timeout)
        try:
            result = self.parse_chat(response.json(), model)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError):
            raise TransientProviderError(f"{self.name}: unreadable answer from the API") from None
        # Prices travel with the handle: poll may run in another process with a newer config.
        data = {"response": result, "input_per_1k": price.input_per_1k, "output_per_1k": price.output_per_1k}
        return RunHandle(provider=self.name, lease=lease, started_at=time.time(), data=data)

    def poll(self, handle: RunHandle) -> RunStatus:
        result = handle.data.get("response")
        if not isinstance(result, dict):
            return RunStatus(state="failed", error=f"{self.name}: run handle holds no response", transient=True)
        if handle.data.get("per_minute") is not None:
            cost = audio_cost(float(result.get("duration_seconds") or 0), float(handle.data["per_minute"]))
        else:
            cost = usage_cost(result.get("usage") or {}, float(handle.data.get("input_per_1k", 0)),
                              float(handle.data.get("output_per_1k", 0)))
        return RunStatus(state="succeeded", result=result, cost=cost)

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        """Nothing is held between requests."""

    def health(self) -> Health:
        if problem := self._key_problem():
            return Health(ok=False, detail=problem)
        if (left := self.cooldown.remaining()) > 0:
            return Health(ok=False, detail=f"rate limited; cooling down {math.ceil(left)}s")
        cached = self._health
        if cached is not None and time.monotonic() - cached[0] < self.health_ttl:
            return cached[1]
        began = time.monotonic()
        try:
            self._request("GET", self.health_path, None, min(self.timeout, 10.0))
            health = Health(ok=True, detail=f"{(time.monotonic() - began) * 1000:.0f} ms; {len(self.models)} models configured")
        except ProviderError as exc:
            health = Health(ok=False, detail=str(exc))
        self._health = (time.monotonic(), health)
        return health

    # --- plumbing ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests this process is waiting on; offers advertise what is left of max_concurrency."""
        return self._in_flight

    @contextmanager
    def _slot(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def _key(self) -> str | None:
        return (os.environ.get(self.key_env) or None) if self.key_env else None

    def _key_problem(self) -> str | None:
        if self.key_env and not self._key():
            return f"{self.name}: no API key: the environment variable ${self.key_env} is not set"
        return None

    def _http(self) -> httpx.Client:
        """One pooled client per process (a client inherited across fork would share its sockets)."""
        if self._client is None or self._client_pid != os.getpid():
            self._client = httpx.Client(follow_redirects=False)
            self._client_pid = os.getpid()
        return self._client

    def _request(self, method: str, path: str, body: Body | None, timeout: float, *,
                 files: dict[str, Any] | None = None, form: dict[str, str] | None = None) -> httpx.Response:
        """One API call, returning only a 2xx answer; everything else becomes a provider error."""
        if problem := self._key_problem():
            raise TransientProviderError(problem)
        if (left := self.cooldown.remaining()) > 0:
            raise TransientProviderError(f"{self.name}: rate limited; cooling down {math.ceil(left)}s")
        key = self._key()
        headers = {**self.extra_headers, **self.auth_headers(key)}
        try:
            response = self._http().request(method, self.base_url + path, json=body, files=files, data=form,
                                            headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        except httpx.HTTPError as exc:
            lost = transport_error(self.name, exc, timeout)
            log.warning("%s", lost)
            raise lost from None
        if response.is_success:
            return response
        if response.status_code in (402, 429):
            raise self._cool_down(response, key) from None
        error = status_error(self.name, self.key_env, response, key)
        log.warning("%s", error)
        raise error from None

    def _cool_down(self, response: httpx.Response, key: str | None) -> TransientProviderError:
        """429 (rate limit) or 402 (credits exhausted): stop offering until the API says to come back."""
        wait = retry_after_seconds(response.headers.get("retry-after"), self.default_cooldown, self.max_cooldown)
        self.cooldown.start(wait)
        self._health = None
        if response.status_code == 429:
            message = f"{self.name}: rate limited (429); cooling down {math.ceil(wait)}s"
        else:
            message = f"{self.name}: payment required (402): {api_message(response, key)}; cooling down {math.ceil(wait)}s"
        log.warning("%s", message)
        return TransientProviderError(scrub(message, key))


def _messages(spec: dict[str, Any], name: str) -> list[dict[str, str]]:
    """The chat to send: the spec's messages, or its prompt as one user message."""
    raw = spec.get("messages")
    if raw:
        return [{"role": str(m.get("role", "user")), "content": str(m.get("content", ""))} for m in raw]
    if spec.get("prompt") is not None:
        return [{"role": "user", "content": str(spec["prompt"])}]
    raise PermanentProviderError(f"{name}: an inference job needs 'messages' or 'prompt'")
