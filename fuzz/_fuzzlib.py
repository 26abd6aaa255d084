"""Shared by the harnesses: the checkout on ``sys.path``, instrumentation, libFuzzer's arguments.

Each harness is run from this folder as ``python NAME.py [libFuzzer flags] [CORPUS_DIR ...]``
(docs/fuzzing.md). Without a corpus directory the run starts from the committed seeds in
``corpus/NAME/`` and keeps what it finds in a fresh temporary directory, so the committed
seeds never change behind your back; name directories to keep the finds.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402

# Let libFuzzer see string comparisons, so it learns keywords ("stop", "anytls://"). Not the
# "RegEx" hook: atheris 3.0's proxy refuses the pos/endpos arguments the parsers pass.
atheris.enabled_hooks.add("str")


def instrumented() -> atheris.import_hook.HookManager:
    """Import the project's modules inside ``with instrumented():`` for coverage feedback."""
    return atheris.instrument_imports(include=["anytls_twisted"])


class Violation(AssertionError):
    """A harness's contract does not hold: libFuzzer reports it as a crash."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise Violation(message)


def splits(seed: bytes, data: bytes, most: int = 8) -> List[bytes]:
    """``data`` cut into chunks (as reads cut a stream) at positions drawn from ``seed``: a
    few bytes of the input, so the fuzzer steers the cuts too."""
    fdp = atheris.FuzzedDataProvider(seed)
    count = fdp.ConsumeIntInRange(0, most)
    cuts = sorted({fdp.ConsumeIntInRange(0, len(data)) for _ in range(count)})
    chunks, start = [], 0
    for cut in cuts + [len(data)]:
        chunks.append(data[start:cut])
        start = cut
    return [c for c in chunks if c] or [data]


def one_line(error: BaseException) -> None:
    """An error meant for a human: one line, no CR or LF."""
    text = str(error)
    check(text and "\n" not in text and "\r" not in text, f"error is not one line: {text!r}")


def main(name: str, test_one_input: Callable[[bytes], None], argv: Sequence[str] = ()) -> None:
    """Run libFuzzer on ``test_one_input``; the committed seeds when no corpus is named."""
    args = list(argv or sys.argv)
    if not any(not arg.startswith("-") for arg in args[1:]):
        scratch = tempfile.mkdtemp(prefix=f"anytls-fuzz-{name}-")
        args[1:1] = [scratch, str(HERE / "corpus" / name)]
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
