"""Adapters on the Hugging Face hub: an ``org/name[@revision]`` argument, and ``--push-to-hub``.

Every command that takes an adapter folder (``excise ops …``, ``inspect``, ``merge``,
``eval … --adapter``) also takes a hub id. :func:`resolve_adapter` turns it into a local
folder the way PEFT's ``from_pretrained`` does: ``huggingface_hub`` fetches it into its
cache (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), so a second use, or one
under ``HF_HUB_OFFLINE=1``, reads the cache and needs no network. A local folder of that
name wins. Only an adapter's own files are fetched (:data:`ADAPTER_FILES`), never the
checkpoints a repository may also hold. The folder is a snapshot named by its commit
(``…/models--org--name/snapshots/<commit>``), so the provenance records that name the
inputs' paths and digests also pin the revision used.

:func:`push_folder` publishes a result folder as it was written, provenance record
included (``excise.json`` for ``ops``, ``excise_merge.json`` for ``merge``).

Only the CLI and the pipeline import this module (STYLE.md rule 1), and ``huggingface_hub``
is imported only when a hub id is used, so ``excise ops`` on local folders stays small.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from excise.errors import AdapterError, ExciseError, first_line

__all__ = ["ADAPTER_FILES", "HubError", "check_push_target", "parse_hub_id", "push_folder", "resolve_adapter"]

# `org/name`: what the hub accepts (letters, digits, `-`, `_`, `.`; no leading `.`/`-`).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

# What an adapter folder holds: PEFT's two files, then excise's records (small JSON).
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "excise.json",
    "train_config.json",
    "loss_log.json",
    "README.md",
)


class HubError(ExciseError, OSError):
    """The hub cannot be reached, or refused to publish a result."""


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` of ``org/name[@revision]``, or None if ``spec`` is not shaped so."""
    repo, sep, revision = spec.partition("@")
    if not _REPO_ID.match(repo) or ".." in repo or (sep and not revision):
        return None
    return repo, revision or None


def resolve_adapter(spec: str | Path) -> Path:
    """The local folder of an adapter given as a folder or as a hub id ``org/name[@revision]``.

    An existing local path wins. A hub id is fetched into the ``huggingface_hub`` cache
    (or read from it when it is there and the hub is unreachable or ``HF_HUB_OFFLINE`` is set).

    Args:
        spec: a local adapter folder, or ``org/name`` with an optional ``@revision``
            (branch, tag or commit).

    Returns:
        The folder (the cached snapshot for a hub id).

    Raises:
        AdapterError: no such folder and not a hub id; the repository or revision is not
            on the hub; it is offline and not cached; or the repository holds no
            ``adapter_config.json``.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    hub = parse_hub_id(str(spec))
    if hub is None:
        raise AdapterError(
            f"adapter folder {spec} not found: it does not exist, and it is not a hub id "
            "org/name or org/name@revision; check the path"
        )
    folder = _download(*hub, spec=str(spec))
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(
            f"hub repository {spec} has no adapter_config.json at its root; is it a PEFT adapter?"
        )
    return folder


def _download(repo: str, revision: str | None, *, spec: str) -> Path:
    """``snapshot_download`` of the adapter files, its errors turned into one line."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(ADAPTER_FILES)))
    except GatedRepoError as err:
        raise AdapterError(
            f"adapter {spec}: the hub repository is gated; accept its terms on the hub and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from err
    except RepositoryNotFoundError as err:
        raise AdapterError(
            f"adapter {spec} not found: no such local folder, and no model repository {repo} on "
            f"{constants.ENDPOINT} (a private one needs `hf auth login` or HF_TOKEN)"
        ) from err
    except RevisionNotFoundError as err:
        raise AdapterError(f"adapter {spec}: the hub repository {repo} has no revision {revision!r}") from err
    except LocalEntryNotFoundError as err:
        if constants.HF_HUB_OFFLINE:
            raise AdapterError(
                f"adapter {spec}: no such local folder, and as a hub id it is not in the Hugging Face "
                "cache and HF_HUB_OFFLINE is set; check the path, or fetch it once online"
            ) from err
        raise AdapterError(
            f"adapter {spec}: no such local folder, and as a hub id it is not in the Hugging Face "
            f"cache and cannot reach the hub at {constants.ENDPOINT}; check the path or the network"
        ) from err
    except (HfHubHTTPError, OSError, ValueError, *_transport_errors()) as err:
        raise AdapterError(f"adapter {spec}: cannot fetch it from the hub ({first_line(err)})") from err


def check_push_target(repo: str) -> str:
    """Check ``--push-to-hub REPO`` before any work is done; return ``repo``.

    Raises:
        HubError: ``repo`` is not ``org/name``, or ``HF_HUB_OFFLINE`` is set.
    """
    if not _REPO_ID.match(repo) or ".." in repo:
        raise HubError(f"--push-to-hub {repo!r} is not a repository id org/name (no @revision)")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubError(f"--push-to-hub {repo} needs the network, but HF_HUB_OFFLINE is set")
    return repo


def push_folder(folder: str | Path, repo: str, *, message: str) -> str:
    """Publish ``folder`` (a result and its provenance record) to the hub model repository ``repo``.

    The repository is created if it does not exist (with the hub's default visibility);
    the folder's files become one commit on its default branch.

    Args:
        folder: the written result.
        repo: ``org/name``.
        message: the commit message.

    Returns:
        The commit's URL.

    Raises:
        HubError: the hub cannot be reached, refuses the token, or the upload fails.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    check_push_target(repo)
    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=message)
    except (HfHubHTTPError, OSError, ValueError, *_transport_errors()) as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
        raise HubError(
            f"wrote {folder}, but publishing it to {repo} on {constants.ENDPOINT} failed: "
            f"{first_line(err)}{hint}; retry with `hf upload {repo} {folder}`"
        ) from err
    return str(info.commit_url)


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's own errors (connection refused, timeout), which are not ``OSError``s.

    ``huggingface_hub`` 1.x talks through ``httpx``, later versions through ``httpx2``.
    """
    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(errors)
