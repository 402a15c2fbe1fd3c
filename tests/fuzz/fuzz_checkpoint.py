"""Coverage-guided fuzzing of the checkpoint reader (atheris, libFuzzer).

    python tests/fuzz/fuzz_checkpoint.py CORPUS_DIR -max_total_time=60 -timeout=10 -rss_limit_mb=3072

`tests/test_fuzz.py` writes the seed corpus (zip and legacy torch.save files, raw pickles, safetensors,
TorchScript archives, pickles carrying payloads, each also truncated and bit-flipped) and runs this for
HYBRIDVIT_FUZZ_SECONDS (60 in CI; longer on demand). Every input is read as a file through
`read_checkpoint_file`, then `extract_state_dict` and `read_run` where they apply. The input fails (and
libFuzzer stops with the input saved) when:

- anything but a `CheckpointError` with a message escapes;
- the payloads' marker file exists afterwards (code from the file ran);
- one input takes longer than -timeout (a hang), or memory passes -rss_limit_mb (an allocation the file
  does not pay for: a header claiming a huge tensor).
"""
from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["hybridvit"]):
    from hybridvit.checkpoint import (
        CheckpointError,
        extract_state_dict,
        is_run_checkpoint,
        read_checkpoint_file,
        read_run,
    )

MARKER = os.environ.get("HYBRIDVIT_FUZZ_MARKER", os.path.join(tempfile.gettempdir(), "hybridvit-fuzz-marker"))
_DIR = tempfile.mkdtemp(prefix="hybridvit-fuzz-")
_PATH = os.path.join(_DIR, "input.pt")


def one_input(data: bytes) -> None:
    with open(_PATH, "wb") as f:
        f.write(data)
    try:
        obj = read_checkpoint_file(_PATH)
        if is_run_checkpoint(obj):
            read_run(obj, _PATH)
        else:
            extract_state_dict(obj, _PATH)
    except CheckpointError as e:
        if not str(e):
            raise AssertionError("a CheckpointError without a message") from e
    except SystemExit as e:  # libFuzzer would only say "fuzz target exited": report it as the failure it is
        raise AssertionError(f"reading the file raised SystemExit({e.code})") from e
    if os.path.exists(MARKER):
        raise AssertionError(f"code from the file ran: {MARKER} exists")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
