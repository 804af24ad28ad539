"""Variant bundles on the Hugging Face Hub (docs/design.md §2): write one locally, push it, pull one rank.

- :mod:`.bundle`: :func:`write_bundle` (the folder: card, config, manifest, ``nested/``, ``r{k}/``).
- :mod:`.card`: the model card, validated as the Hub would.
- :mod:`.push`: :func:`push_bundle` (one commit; unchanged files are not uploaded again).
- :mod:`.pull`: :func:`pull_rank` (one rank, sha256-verified against the manifest).

Importing this package does not import ``huggingface_hub``; the functions do.
"""

from .bundle import Bundle, write_bundle
from .pull import PullResult, pull_rank
from .push import PushResult, push_bundle

__all__ = ["Bundle", "PullResult", "PushResult", "pull_rank", "push_bundle", "write_bundle"]
