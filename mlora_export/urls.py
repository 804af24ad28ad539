"""URLs shown or recorded without their credentials (an endpoint given as ``https://user:secret@host``)."""

from __future__ import annotations

import re

#: The userinfo of a URL: everything between ``scheme://`` and the last ``@`` of the authority.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s?#]*@")


def redact_url(text: str) -> str:
    """``text`` with the userinfo (``user:secret@``) of every URL in it replaced by ``***@``:
    what is shown or recorded of an endpoint, never its credentials."""
    return _USERINFO.sub(r"\g<scheme>***@", str(text))


__all__ = ["redact_url"]
