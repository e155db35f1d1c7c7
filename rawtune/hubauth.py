"""Which Hugging Face token rawtune may use, where the Hub is, what a Hub id looks like, and
how the Hub's HTTP errors read as rawtune errors.

The rule: a token given for this request (``--token``, the token a visitor pasted, or the
visitor's Space OAuth login) always comes first. The machine's own credentials (``HF_TOKEN`` and
the ``hf auth login`` store) are *ambient*: they belong to whoever runs the process, so they are
consulted only where that person is also the user (the CLI, a local single-user app). On a
shared app they are never used for a visitor; :func:`resolve_token` then returns ``False``,
which huggingface_hub and datasets read as "send no token at all" (``None`` would make them look
up the ambient token themselves).

Nothing here stores or logs a token.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Union

from .errors import HubError
from .rundir import scrub

# A token value as rawtune hands it to the Hub clients: the token, None ("none found, clients may
# not find one either"), or False ("never send one, not even the machine's own").
Token = Union[str, bool, None]

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
LOGIN_HINT = "pass --token, set HF_TOKEN, or run `hf auth login`"
VISITOR_HINT = "sign in with Hugging Face (or paste your own token) on this page"


def is_repo_id(spec: Any) -> bool:
    """True for a Hub repo id of the form ``user/name`` (no path parts, no leading dot)."""
    text = str(spec or "")
    return bool(REPO_ID_RE.match(text)) and ".." not in text


def _value(token: Any) -> Optional[str]:
    """A plain token string from a string or a ``gr.OAuthToken`` (anything with ``.token``)."""
    if token is None or token is False:
        return None
    value = token if isinstance(token, str) else getattr(token, "token", None)
    return str(value).strip() if value and str(value).strip() else None


def ambient_token() -> Optional[str]:
    """The machine's own token: ``HF_TOKEN``, else the ``hf`` CLI's stored login."""
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env and env.strip():
        return env.strip()
    try:
        from huggingface_hub import get_token

        stored = get_token()
    except Exception:  # a broken token file must not stop rawtune; it just means "no token"
        stored = None
    return stored.strip() if stored and stored.strip() else None


def resolve_token(explicit: Any = None, oauth_token: Any = None, allow_ambient: bool = True) -> Token:
    """The token to use: ``explicit``, then ``oauth_token``, then (only if ``allow_ambient``)
    the machine's own token.

    Returns the token, ``None`` when ambient credentials are allowed but there are none, or
    ``False`` when they are not allowed and the request brought no token of its own.
    ``explicit=False`` (already resolved to "no token") stays ``False``.
    """
    if explicit is False:
        return False
    own = _value(explicit) or _value(oauth_token)
    if own:
        return own
    if not allow_ambient:
        return False
    return ambient_token()


def login_hint(token: Token) -> str:
    """How to supply a token, worded for where the request came from."""
    return VISITOR_HINT if token is False else LOGIN_HINT


def endpoint() -> str:
    """The Hub's base URL: ``HF_ENDPOINT`` as set now, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


# ---------------------------------------------------------------- Hub errors


def safe_text(exc: Any) -> str:
    """The first line of an error text with anything token-like masked (client errors may echo it)."""
    return scrub(str(exc).splitlines()[0] if str(exc) else "")


def http_status(exc: Exception) -> Optional[int]:
    """The HTTP status of a huggingface_hub error, or None when it carries no response."""
    response = getattr(exc, "response", None)
    return response.status_code if response is not None else None


def hub_error(exc: Exception, doing: str, retry: str, rejected: Optional[str] = None) -> HubError:
    """A Hub client error met while ``doing`` something, as one HubError.

    401 reads as ``rejected`` (how to replace the token; the caller's words, since reading and
    writing need different tokens); offline mode and connection failures say so; any other
    answer is reported with its scrubbed text. ``retry`` is the advice for the call at hand.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        if http_status(exc) == 401 and rejected:
            return HubError(rejected)
        return HubError(f"{doing} failed ({safe_text(exc)}); {retry}")
    if constants.HF_HUB_OFFLINE:
        return HubError(f"cannot finish {doing}: offline mode is on (HF_HUB_OFFLINE); unset it, {retry}")
    return HubError(f"cannot reach the Hub at {endpoint()} while {doing} ({type(exc).__name__}); "
                    f"check the network connection, {retry}")


def user_name(token: Token, doing: str, retry: str) -> str:
    """The Hub user a token belongs to (``whoami``), or one HubError saying what failed while ``doing``."""
    from huggingface_hub import HfApi

    try:
        return HfApi(endpoint=endpoint(), token=token).whoami()["name"]
    except Exception as exc:
        raise hub_error(exc, doing, retry, f"the Hub rejected the token; {login_hint(token)}") from None
