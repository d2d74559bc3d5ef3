"""Mask credentials before text or parameters leave the process (logs, MLflow params and tags).

What is masked:
- the password of a URI's user-info: ``postgresql://user:pw@host`` -> ``postgresql://user:***@host``;
- AWS access key ids (``AKIA``/``ASIA``/... + 16 characters) and 40-character secret access keys;
- values of credential-like query parameters (``?token=...``, ``X-Amz-Signature=...``);
- ``Bearer``/``Basic`` credentials (those containing a digit), ``NAME_TOKEN=value``-style environment
  assignments (not ``..._PATH=``/``..._FILE=``, which say where a secret is), PEM private keys.

A 40-character secret key has no fixed prefix, so it is recognised by shape: a run of exactly 40
base64 characters mixing upper case, lower case and digits or symbols, with the character entropy
of random data. Git commit ids (lower-case hex) and ordinary paths do not pass that test.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

MASK = "***"

_URI_PASSWORD = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]*:)([^@\s/]+)(@)")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z0-9]{16}\b")
_SECRET_CANDIDATE = re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_QUERY_SECRET = re.compile(
    r"([?&;](?:access_token|refresh_token|id_token|token|api[_-]?key|apikey|key|secret|client_secret|"
    r"password|passwd|pwd|sig|signature|auth|code|sas|x-amz-signature|x-amz-credential|"
    r"x-amz-security-token|x-goog-signature|x-goog-credential)=)([^&#\s]+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+([A-Za-z0-9._~+/\-]{8,}=*)")
_ENV_SECRET = re.compile(
    r"\b([A-Z][A-Z0-9_]*(?:SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|ACCESS_KEY|SECRET_KEY|CREDENTIALS?)"
    r"(?:_[A-Z0-9]+)*\s*[=:]\s*)(?!\*\*\*)([^\s'\"]+)"
)
# ``RAY_AUTH_TOKEN_PATH=...`` names where a secret is, not the secret.
_NOT_SECRET_SUFFIX = re.compile(r"_(?:PATH|FILE|DIR|MODE|NAME|ARN|URI|URL)\s*[=:]\s*$")
_PRIVATE_KEY = re.compile(
    r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.DOTALL
)

# Parameter/tag names whose values are secrets whatever they look like.
_SECRET_WORDS = {"password", "passwd", "pwd", "secret", "token", "apikey", "credential", "credentials"}
_SECRET_PAIRS = {"api_key", "access_key", "secret_key", "private_key", "auth_token", "session_token",
                 "client_secret", "secret_access"}


_DIGITS_SYMBOLS = set("0123456789/+")


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _looks_like_aws_secret(s: str) -> bool:
    chars = set(s)
    upper, lower = any(c.isupper() for c in chars), any(c.islower() for c in chars)
    return upper and lower and bool(chars & _DIGITS_SYMBOLS) and _entropy(s) >= 4.15


def redact(text: str) -> str:
    """``text`` with every credential-like part replaced by ``***`` (the rest unchanged)."""
    if not text:
        return text
    out = _PRIVATE_KEY.sub(lambda m: f"-----BEGIN {m.group(1)}PRIVATE KEY----- {MASK}", text)
    out = _URI_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), out)
    out = _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, out)
    out = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}" if re.search(r"\d", m.group(2)) else m.group(0), out)
    out = _ENV_SECRET.sub(
        lambda m: m.group(0) if _NOT_SECRET_SUFFIX.search(m.group(1)) else m.group(1) + MASK, out)
    out = _AWS_KEY_ID.sub(lambda m: m.group(1) + MASK, out)
    out = _SECRET_CANDIDATE.sub(lambda m: MASK if _looks_like_aws_secret(m.group(0)) else m.group(0), out)
    return out


def is_secret_like(value: Any) -> bool:
    """True if ``value`` (a string) holds anything ``redact`` would mask."""
    return isinstance(value, str) and redact(value) != value


def is_secret_name(name: str) -> bool:
    """True for parameter/tag names such as ``db_password``, ``apiKey``, ``AWS_SECRET_ACCESS_KEY``."""
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])", str(name)) if w]
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(f"{a}_{b}" in _SECRET_PAIRS for a, b in zip(words, words[1:], strict=False))


def safe_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``params`` fit for MLflow params/tags: values under secret-like names become ``***``,
    strings are passed through ``redact``, nested mappings and lists are cleaned the same way.
    Keys are kept, so a reader still sees that a value was set."""

    def clean(key: str, value: Any) -> Any:
        if is_secret_name(key) and value not in (None, "", MASK):
            return MASK if not isinstance(value, Mapping) else safe_params(value)
        if isinstance(value, str):
            return redact(value)
        if isinstance(value, Mapping):
            return safe_params(value)
        if isinstance(value, (list, tuple)):
            return type(value)(clean(key, v) for v in value)
        return value

    return {k: clean(k, v) for k, v in params.items()}
