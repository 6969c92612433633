"""The Hugging Face hub as loads see it: whether it can be reached from here, and a hub model's
model_index.json fetched ahead of its weights.

Loads call these through this module (`hub.hub_unreachable()`), so that one replacement of a name here
(a test's monkeypatch) reaches every caller.
"""

from __future__ import annotations

import functools

from runner import families
from runner.models.identity import BaseModel


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here (a failed name lookup or connection, found
    in at most a few seconds), or None. Without a network, the hub client retries each request for
    about 20 s; where this says why, loads read the Hugging Face cache alone instead."""
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _probe_hub(constants.ENDPOINT)


@functools.cache
def _probe_hub(endpoint: str) -> str | None:
    """Why a connection to `endpoint` fails, or None; asked once per process. Through a proxy the hub is
    not probed (a direct connection says nothing of it)."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    url, proxies = urlsplit(endpoint), urllib.request.getproxies()
    if url.scheme in proxies or "all" in proxies or not url.hostname:
        return None
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as exc:
        return f"{url.hostname} cannot be reached ({exc.strerror or exc})"
    return None


def fetch_hub_index(base: BaseModel) -> None:
    """Put a hub model's model_index.json in the Hugging Face cache (a few hundred bytes) where it is not
    there yet, so that its family and commit are known before its weights are downloaded; quietly nothing
    when offline. A cached model is left as it is: fetching would move its branch (`refs/main`) to the hub's
    newest commit, another one than the build planned with."""
    if base.kind != "hub" or families.cached_hub_index(base.ref, base.revision).is_file():
        return
    if hub_unreachable():
        return
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(base.ref, "model_index.json", revision=base.revision)
    except Exception:  # noqa: BLE001 - offline, private or unknown: detection falls back to sd1
        pass
