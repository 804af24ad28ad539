"""Variant bundles on the Hugging Face Hub (docs/design.md §2): write one locally, push it, pull one rank.

- :mod:`.bundle`: :func:`write_bundle` (the folder: card, config, manifest, ``nested/``, ``r{k}/``),
  with :class:`BundleOptions`.
- :mod:`.card`: the model card, validated as the Hub would.
- :mod:`.remote`: the Hub client, its endpoint and its errors.
- :mod:`.push`: :func:`push_bundle` (one commit; unchanged files are not uploaded again, :class:`PushOptions`)
  and :func:`publish` (a bundle, or a nested adapter bundled on the fly, pushed or listed with ``dry_run``).
- :mod:`.choose`: :class:`RankBudget`, a rank chosen by size, latency and recorded score.
- :mod:`.pull`: :func:`pull_rank` (one rank, sha256-verified against the manifest).

Importing this package does not import ``huggingface_hub``; the functions do.
"""

from .bundle import Bundle, BundleOptions, write_bundle
from .choose import RankBudget
from .pull import PullResult, pull_rank
from .push import PublishResult, PushOptions, PushResult, publish, push_bundle

__all__ = [
    "Bundle", "BundleOptions", "PublishResult", "PullResult", "PushOptions", "PushResult", "RankBudget", "publish", "pull_rank",
    "push_bundle", "write_bundle",
]
