"""Resolve a model argument (hub repo id or local path) to files on disk.

The only module that imports ``huggingface_hub``: downloads use its cache and progress
bars. With no network (or ``HF_HUB_OFFLINE=1``) and nothing cached, the caller gets one
:class:`ModelNotAvailable` sentence naming the repo and the ``--model PATH`` option.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

#: Default CSM weights: an ungated copy of ``sesame/csm-1b`` in the transformers layout
#: (config.json + model.safetensors with the Mimi codec under ``codec_model.*`` + tokenizer).
#: ``sesame/csm-1b`` itself is gated: accept its licence on the hub and log in to use it.
DEFAULT_MODEL = "unsloth/csm-1b"
#: Llama-3.2 tokenizer for checkpoints that don't ship one (ungated copy of meta-llama/Llama-3.2-1B).
DEFAULT_TOKENIZER_REPO = "unsloth/Llama-3.2-1B"
#: Kyutai's Mimi checkpoint, as the official CSM generator loads it.
DEFAULT_MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILENAME = "tokenizer-e351c8d8-checkpoint125.safetensors"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotAvailable(RuntimeError):
    """Weights that are neither on disk nor downloadable right now."""


def is_repo_id(name: str) -> bool:
    """True if ``name`` looks like ``owner/repo`` and is not an existing local path."""
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def resolve_repo(name: str | Path, *, allow_patterns: list[str] | None = None) -> Path:
    """Return a local directory (or file) for ``name``: an existing path, or a hub snapshot.

    Args:
        name: a local file/directory, or a hub repo id ``owner/name``.
        allow_patterns: files of the repo to download (default: everything but ``*.pt``/``*.bin``
            duplicates of the safetensors weights).
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not is_repo_id(str(name)):
        raise ModelNotAvailable(f"model path {name} not found (and it is not a hub repo id owner/name)")
    from huggingface_hub import snapshot_download

    patterns = allow_patterns or ["*.json", "*.safetensors", "*.model", "*.txt"]
    return _download(str(name), lambda: Path(snapshot_download(repo_id=str(name), allow_patterns=patterns)))


def resolve_file(repo_id: str, filename: str) -> Path:
    """Download (or find in the cache) one file of a hub repo."""
    from huggingface_hub import hf_hub_download

    return _download(repo_id, lambda: Path(hf_hub_download(repo_id=repo_id, filename=filename)))


def _download(repo_id: str, fetch) -> Path:
    from huggingface_hub import errors

    try:
        return fetch()
    except errors.GatedRepoError:
        raise ModelNotAvailable(
            f"{repo_id} is gated on the Hugging Face hub: accept its licence on its page and log in "
            "(`hf auth login`), or pass --model PATH to a local copy."
        ) from None
    except errors.RepositoryNotFoundError:
        raise ModelNotAvailable(
            f"{repo_id} was not found on the Hugging Face hub; check the name, or pass --model PATH."
        ) from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.HfHubHTTPError, OSError) as err:
        logger.debug("download of %s failed: %r", repo_id, err)
        raise ModelNotAvailable(
            f"Could not download {repo_id} from the Hugging Face hub and it is not in the local cache "
            "(no network, or HF_HUB_OFFLINE=1): connect once to download it, or pass --model PATH "
            "to a local copy of the weights."
        ) from None
