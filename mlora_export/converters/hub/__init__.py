"""Variant bundles on the Hugging Face Hub (docs/design.md §2): write one locally, push it, pull one rank.

- :mod:`.bundle`: :func:`write_bundle` (the folder: card, config, manifest, ``nested/``, ``r{k}/``).
- :mod:`.card`: the model card, validated as the Hub would.
- :mod:`.push`: :func:`push_bundle` (one commit; unchanged files are not uploaded again) and
  :func:`publish` (a bundle, or a nested adapter bundled on the fly, pushed or listed with ``dry_run``).
- :mod:`.pull`: :func:`pull_rank` (one rank, sha256-verified against the manifest).

Importing this package does not import ``huggingface_hub``; the functions do.
"""

from .bundle import Bundle, write_bundle
from .pull import PullResult, pull_rank
from .push import PublishResult, PushResult, publish, push_bundle

__all__ = ["Bundle", "PublishResult", "PullResult", "PushResult", "publish", "pull_rank", "push_bundle", "write_bundle"]
