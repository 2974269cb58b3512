"""Final answers of free-form (math) completions, and checking them against a reference.

A reasoning completion such as "Natalia sold 48/2 = 24 clips in May.\\n48+24 = 72\\n#### 72" states its
answer somewhere in the whole text, not on its first line. `final_answer(text)` finds it, in order:

1. the content of the last `\\boxed{...}` (braces balanced, so `\\boxed{\\frac{1}{2}}` is whole);
2. the rest of the line after the last `####` (GSM8K's convention);
3. otherwise the last number in the text (`-3`, `1,234`, `0.5`, `3/4`).

A reference answer is read by rules 1 and 2 only, and taken whole otherwise: a GSM8K row whose `answer`
holds the worked solution ending in `#### 72` is compared as 72, a MATH row's `\\boxed{}` as its
content, and a bare `\\frac{1}{2}` as itself (not as its last number).

Verifiers (`VERIFIERS`):
- `math` — math-verify (`pip install math-verify`, a core dependency) decides equivalence of the two
  extracted answers: `\\frac{1}{2}` = `0.5` = `1/2`, `3,000` = `3000`, LaTeX and plain text. When the
  completion has neither `\\boxed` nor `####`, math-verify's own parser reads the whole completion (it
  prefers "the final answer is X" and otherwise takes the last expression), rather than rule 3.
- `exact` — the extracted strings must be equal after stripping (no dependency; `72.0` != `72`).
"""

from __future__ import annotations

import re

from jackpot.errors import InputError

VERIFIERS = ("math", "exact")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces; None if there is none."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i]
                break
    return None if found is None else found.strip()


def after_hashes(text: str) -> str | None:
    """The stripped rest of the line after the last `####`; None if there is no `####` (or nothing follows)."""
    i = text.rfind("####")
    if i == -1:
        return None
    rest = text[i + 4:].strip().split("\n", 1)[0].strip()
    return rest or None


def last_number(text: str) -> str | None:
    """The last number in `text` with thousands separators removed (`1,234` -> `1234`); None if none."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return numbers[-1].replace(",", "").rstrip(".")


def final_answer(text: str) -> str | None:
    """The answer `text` states: last `\\boxed{}`, else after the last `####`, else the last number."""
    return last_boxed(text) or after_hashes(text) or last_number(text)


def marked_answer(text: str) -> str | None:
    """The answer only if explicitly marked (`\\boxed{}` or `####`); what a format reward checks for."""
    return last_boxed(text) or after_hashes(text)


def require_math_verify():
    """The `math_verify` module, or ImportError saying how to install it or avoid it."""
    try:
        import math_verify
    except ImportError:
        raise ImportError("the 'math' verifier needs math-verify: pip install math-verify (it is a dependency of "
                          "jackpot; reinstall with `pip install -e .`), or set task.options.verifier=exact") from None
    return math_verify


def is_correct(completion: str, reference: str, verifier: str = "math") -> bool:
    """Whether `completion` states the same final answer as `reference` under `verifier` (see module docstring)."""
    if verifier not in VERIFIERS:
        raise InputError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
    gold = marked_answer(reference) or reference.strip()
    if verifier == "exact":  # numbers compared as final_answer reads them: without thousands separators
        given = final_answer(completion)
        if _NUMBER.fullmatch(gold):
            gold = last_number(gold)
        return given is not None and given == gold
    math_verify = require_math_verify()
    marked = marked_answer(completion)
    try:
        parsed_gold = math_verify.parse(_as_latex(gold))
        parsed = math_verify.parse(_as_latex(marked) if marked is not None else completion)
        return bool(parsed_gold) and bool(parsed) and bool(math_verify.verify(parsed_gold, parsed))
    except Exception:  # math-verify raises on some malformed input (and on its own timeouts): not an answer
        return False


def _as_latex(answer: str) -> str:
    """An extracted answer in the form math-verify parses most reliably: inside `\\boxed{}`."""
    return f"\\boxed{{{answer}}}"
