"""``ModelCache``: the agent's current model — pull (ETag cache), verify, ONNX swap, predict.

No counters and no events here: ``pull``/``refresh_onnx`` raise ``AgentError`` and return
what changed; ``EdgeAgent`` counts and reports. ``ModelStore`` is the interface the agent
uses, so a simulator can wrap a cache (e.g. to add download time). A store that also
implements ``ScoringStore`` (``ModelCache`` does) lets ``eval`` tasks score the version they
name and ``stats`` tasks read only the manifest; ``pull_for_eval``/``manifest_for_stats``
fall back to ``pull`` (the latest version) for a store that does not.

``model_client(settings, http)`` builds the agent's ``ModelClient`` from its settings: the
weights cache in ``{state_dir}/models``, the highest accepted ``latest`` publications in
``{state_dir}/model-publications.json`` (both only when the agent is durable), the pinned
key from ``public_key_hex`` or ``model_key_file`` (default ``{state_dir}/model-signing.pub``)
and ``require_pinned_key``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

import httpx
import numpy as np
import numpy.typing as npt

from edge_agent.errors import NoModelError
from edge_agent.inference import OnnxModel, logits_fn
from edge_agent.models import ModelClient, PublicationLog, VerifiedModel
from edge_agent.settings import AgentSettings
from schemas.messages import ModelManifest
from schemas.types import F32


class ModelStore(Protocol):
    def open(self, http: httpx.AsyncClient) -> None:
        """Bind the HTTP client (``EdgeAgent.start()`` calls it once)."""

    async def pull(self, name: str) -> VerifiedModel:
        """Pull and verify the latest version of ``name``; it becomes the current model."""

    async def refresh_onnx(self, name: str, version: int) -> int | None:
        """Pull the ONNX artifact; hot-swap it in. The new version, or None if unchanged."""

    @property
    def version(self) -> int | None: ...

    def predict(self, x: npt.ArrayLike) -> F32: ...


@runtime_checkable
class ScoringStore(Protocol):
    """What ``eval`` and ``stats`` tasks use of a store when it has it."""

    async def pull_version(self, name: str, version: int) -> VerifiedModel:
        """Version ``version`` of ``name`` verified (-1, or gone: the latest); it does not
        become the current model."""

    async def manifest(self, name: str) -> ModelManifest:
        """The latest manifest of ``name`` (no weights)."""


async def pull_for_eval(store: ModelStore, name: str, version: int) -> VerifiedModel:
    """The model an ``eval`` task scores: ``version`` when the store can pull versions,
    else the latest (its manifest says which version it is)."""
    if isinstance(store, ScoringStore):
        return await store.pull_version(name, version)
    return await store.pull(name)


async def manifest_for_stats(store: ModelStore, name: str) -> ModelManifest:
    """The latest manifest (a ``stats`` task needs the job's model shape, not weights)."""
    if isinstance(store, ScoringStore):
        return await store.manifest(name)
    return (await store.pull(name)).manifest


PUBLICATIONS_FILE = "model-publications.json"
KEY_FILE = "model-signing.pub"


def model_client(settings: AgentSettings, http: httpx.AsyncClient) -> ModelClient:
    """The ``ModelClient`` an agent with ``settings`` uses (see the module docstring)."""
    s = settings
    state = s.state_dir if s.durable else None
    key_file = s.model_key_file
    if key_file is None and s.state_dir is not None:
        key_file = s.state_dir / KEY_FILE
    return ModelClient(
        http,
        s.api_url,
        cache_dir=None if state is None else state / "models",
        public_key_hex=s.public_key_hex,
        max_bytes=s.max_model_bytes,
        key_file=key_file,
        require_pinned_key=s.require_pinned_key,
        publications=PublicationLog(None if state is None else state / PUBLICATIONS_FILE),
    )


class ModelCache:
    """The default ``ModelStore``: a ``ModelClient`` plus the current model and ONNX runtime."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.client: ModelClient | None = None
        self.model: VerifiedModel | None = None
        self.onnx: OnnxModel | None = None
        self.onnx_version = -1

    def open(self, http: httpx.AsyncClient) -> None:
        self.client = model_client(self.settings, http)

    def _client(self) -> ModelClient:
        assert self.client is not None, "agent not started"
        return self.client

    async def pull(self, name: str) -> VerifiedModel:
        self.model = await self._client().pull(name)
        return self.model

    async def pull_version(self, name: str, version: int) -> VerifiedModel:
        return await self._client().pull_version(name, version)

    async def manifest(self, name: str) -> ModelManifest:
        return await self._client().latest_manifest(name)

    async def refresh_onnx(self, name: str, version: int) -> int | None:
        art = await self._client().onnx(name, version)
        if art.version == self.onnx_version:
            return None
        onnx_model = await asyncio.to_thread(OnnxModel.load, art.data)
        self.onnx, self.onnx_version = onnx_model, art.version  # hot swap
        return art.version

    @property
    def version(self) -> int | None:
        return None if self.model is None else self.model.manifest.version

    def predict(self, x: npt.ArrayLike) -> F32:
        """Logits for ``x[n, n_features]``: onnxruntime when a verified ONNX artifact is
        loaded, else the numpy reference forward pass on the verified weights."""
        arr = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if self.onnx is not None:
            return self.onnx.run(arr)
        if self.model is not None:
            m = self.model
            return logits_fn(m.manifest.spec, m.params, m.artifact)(arr)
        raise NoModelError("no_model", "no verified model loaded yet")
