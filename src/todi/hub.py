"""``--push-to-hub``: upload a finished model folder to the Hugging Face Hub.

It runs after the run folder is complete and released, so a failed upload (no token, no network) never
touches the local result; the error says how to upload that folder by hand.
"""

from __future__ import annotations

import logging
from pathlib import Path

from todi.errors import TodiError

logger = logging.getLogger(__name__)

__all__ = ["push_folder"]


def push_folder(folder: Path, repo_id: str, *, commit_message: str) -> str:
    """Create ``repo_id`` (a model repository) if needed and upload ``folder`` to it; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message
        )
    except Exception as err:  # auth, network, a name the Hub refuses: the local model is complete either way
        reason = (f"{type(err).__name__}: {err}".strip().splitlines() or [""])[0][:300]
        raise TodiError(
            f"--push-to-hub: uploading {folder} to {repo_id} failed ({reason}); the model itself is saved there",
            f"log in (`hf auth login` or HF_TOKEN) and upload it with `hf upload {repo_id} {folder}`",
        ) from err
    logger.info("uploaded %s to %s", folder, url)
    return str(url)
