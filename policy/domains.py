"""Request domains from cheap textual cues (no model call on the request path).

Where it sits: ``routing.ExpertiseRouter`` classifies each new request's prompt with
``classify_domain`` and keeps its acceptance table per domain. A misclassified prompt
costs speed (a weaker drafter), never correctness.
"""

from __future__ import annotations

import re

DOMAINS = ("code", "data", "prose")

_CODE_CUES = re.compile(
    r"^\s*(def |class |import |from \S+ import|return\b|if .*:$|for .* in .*:$|@\w+|#|\"\"\")|"
    r"[=!]=|\bself\.|\(\)|:\s*$|^\s*\w+(\.\w+)*\s*=\s*\S|__\w+__",
    re.MULTILINE,
)
_DATA_CUES = re.compile(
    r'"\w+"\s*:|^\s*[\w.-]+(,[\w .:/-]*){3,}$|\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}|'
    r"\b(INFO|WARN|WARNING|ERROR|DEBUG)\b|^\s*[{\[]|"
    r"\b\d{1,3}(\.\d{1,3}){3}\b|\[\d{2}/\w{3}/\d{4}:|\b(GET|POST|PUT|DELETE) /",
    re.MULTILINE,
)


def classify_domain(text: str) -> str:
    """``code``, ``data`` or ``prose`` from textual cues in (the end of) a prompt."""
    tail = text[-2000:]
    lines = max(1, tail.count("\n") + 1)
    code = len(_CODE_CUES.findall(tail)) / lines
    data = len(_DATA_CUES.findall(tail)) / lines
    if max(code, data) < 0.15:
        return "prose"
    return "code" if code >= data else "data"
