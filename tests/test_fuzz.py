"""The checkpoint reader under coverage-guided fuzzing (tests/fuzz/fuzz_checkpoint.py, atheris) for a
bounded time: HYBRIDVIT_FUZZ_SECONDS, 60 by default (CI); set it higher to fuzz longer on demand."""
from __future__ import annotations

import argparse
import base64
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


# inputs the fuzzer found failing, fixed since: a protocol-4 BYTEARRAY8 claiming 5.5 GB (the pure-Python
# unpickler allocated the claimed length before reading it)
FOUND = ["gASVJAAAAAAAAAB9lCiMAWGWXZQoSwEAAABARwB6AACMAXOVZYyUAU5idYiGlC4="]
# a zip torch.save whose dict says format "hybridvit-run" without a model name or weights (read_run raised
# KeyError); tests/test_security.py::test_run_checkpoint_without_its_fields_is_refused has its neighbours
FOUND_HOLLOW_RUN = (
    "UEsDBAAACAiMAAAAAAAAAAAAAAAAAAAAAAAMABYAcnVuL2RhdGEucGtsRkISAFpaWlpaWlpaWlpaWlpaWlpaWoACfXEAKFgGAAAA"
    "Zm9ybWF0cQFYDQAAAGh5YnJpZHZpdC1ydW5xAlgHAAAAdmVyM2lvbnEDSwJYCgAAAG1vZGVsX25hbWVxBFgOAAAAZmFzdGVydml0"
    "X25hbm9xBVgMAAAAbW9kZWxfa3dhcmdzcQZ9cQdYCAAAAGltZ19zaXplcQhLQHNYCwAAAG51bV9jbGFzc2VzcQlLAlgLAAAAY2xh"
    "c3NfbmFtZXpxCl1xCyhYAQAAAGFxDFgBAAAAYnENZVgOAAAAcHJldHJhaW5lZF9jZmdxDn1xD1gKAAAAaW5wdXRfc2l6ZXEQSwNL"
    "QEtAh3ERc1gKAAAAc3RddGVfZGljdHESfXETKFgBAAAAd3EUY3RvcmNoLl91dGlscwpfcmVidWlsZF90ZW5zb3JfdjIKcRUoKFgH"
    "AAAAc3RvcmFnZXEWY3RvcmNoCkZsb2F0U3RvcmFnZQpxF1gBAAAAMHEYWAMAAABjcHVxGUsGdHEaUUsASwNLAoZxG0sCSwGGcRyJ"
    "Y2NvbGxlY3Rpb25zCk9yZGVyZWREaWN0CnEdKVJxHnRxH1JxIGgNaBUoKGgWY3RvcmNoCkxvbmdTdG9yYWdlCnEhWAEAAAAxcSJo"
    "GUsEdHEjUUsASwSFcSRLAYVxJYloHSlScSZ0cSdScShYAQAAAGhxKWgVKChoFmN0b3JjaApIYWxmU3RvcmFnZQpxKlgBAAAAMnEr"
    "aBlLAnRxLFFLAEsChXEtSwGFcS6JaB0pUnEvdHEwUnExdVgOAAAAc3RhdGVfZGljdF9lbWFxMk5YCwAAAHRyYWluX3N0YXRlcTNO"
    "WAYAAABjb25maWdxNE51LlBLBwgFj8picwIAAHMCAABQSwMEAAAICAAAAAAAAAAAAAAAAAAAAAAAABMADABydW4vLmZvcm1hdF92"
    "ZXJzaW9uRkIIAFpaWlpaWlpaMVBLBwi379yDAQAAAAEAAABQSwMEAAAICAAAAAAAAAAAAAAAAAAAAAAAABYAOwBydW4vLnN0b3Jh"
    "Z2VfYWxpZ25tZW50RkI3AFpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlo2NFBL"
    "Bwg/d3HpAgAAAAIAAABQSwMEAAAICAAAAAAAAAAAAAAAAAAAAAAAAA0AQwBydW4vYnl0ZW9yZGVyRkI/AFpaWlpaWlpaWlpaWlpa"
    "WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWmxpdHRsZVBLBwiFPeMZBgAAAAYAAABQSwME"
    "AAAICAAAAAAAAAAAAAAAAAAAAAAAAAoAQgBydW4vZGF0YS8wRkI+AFpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpa"
    "WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaAu/bPoNuVr+zS6e/Liwhv7GlkD/roLg+UEsHCIoCNjIYAAAAGAAAAFBLAwQAAAgI"
    "AAAAAAAAAAAAAAAAAAAAAAAACgAwAHJ1bi9kYXRhLzFGQiwAWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpa"
    "WlpaWloAAAAAAAAAAAEAAAAAAAAAAgAAAAAAAAADAAAAAAAAAFBLBwgKEgCRIAAAACAAAABQSwMEAAAICAAAAAAAAAAAAAAAAAAA"
    "AAAAAAoAKABydW4vZGF0YS8yRkIkAFpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWgA8ADxQSwcIb79aIwQAAAAE"
    "AAAAUEsDBAAACAgAAAAAAAAAAAAAAAAAAAAAAAALAEMAcnVuL3ZlcnNpb25GQj8A2lpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpa"
    "WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaMwpQSwcI0Z5nVQIAAAACAAAAUEsDBAAACAgAAAAAAAAAAAAAAAAA"
    "AAAAAAAaADYAcnVuLy5kYXRhL3NlcmlhbGl6YXRpb25faWRGQjIAWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpa"
    "WlpaWlpaWlpaWlpaWlowODQ5NDg4ODQ3OTY1MDQ4NzM1MDE0Nzc4NDYwMDc3MDIwMjM0Nzk5UEsHCOCl1cUoAAAAKAAAAFBLAQIA"
    "AAAACAgAAAAAAAAFj8picwIAAHMCAAAMAAAAAAAAAAAAAAAAAAAAAABydW4vZGF0YS5wa2xQSwECAAAAAAgIAAAAAAAAt+/cgwEA"
    "AAABAAAAEwAAAAAAAAAAAAAAAADDAgAAcnVuLy5mb3JtYXRfdmVyc2lvblBLAQIAAAAACAgAAAAAAAA/d3HpAgAAAAIAAAAWAAAA"
    "AAAAAAAAAAAAABEDAABydW4vLnN0b3JhZ2VfYWxpZ25tZW50UEsBAgAAAAAICAAAAAAAAIU94xkGAAAABgAAAA0AAAAAAAAAAAAA"
    "AAAAkgMAAHJ1bi9ieXRlb3JkZXJQSwECAAAAAAgIAAAAAAAAigI2MhgAAAAYAAAACgAAAAAAAAAAAAAAAAAWBAAAcnVuL2RhdGEv"
    "MFBLAQIAAAAACAgAAAAAAAAKEgCRIAAAACAAAAAKAAAAAAAAAAAAAAAAAKgEAABydW4vZGF0YS8xUEsBAgAAAAAICAAAAAAAAG+/"
    "WiMEAAAABAAAAAoAAAAAAAAAAAAAAAAAMAUAAHJ1bi9kYXRhLzJQSwECAAAAAAgIAAAAAAAA0Z5nVQIAAAACAAAACwAAAAAAAAAA"
    "AAAAAACUBQAAcnVuL3ZlcnNpb25QSwECAAAAAAgIAAAAAAAA4KXVxSgAAAAoAAAAGgAAAAAAAAAAAAAAAAASBgAAcnVuLy5kYXRh"
    "L3NlcmlhbGl6YXRpb25faWRQSwYGLAAAAAAAAAAeAy0AAAAAAAAAAAAJAAAAAAAAAAkAAAAAAAAAIwIAAAAAAAC4BgAAAAAAAFBL"
    "BgcAAAAA2wgAAAAAAAABAAAAUEsFBgAAAAAJAAkAIwIAALgGAAAAAA=="
)

# a legacy torch.save whose weights dict holds a tensor under a tuple key (extract_state_dict raised
# AttributeError on k.startswith)
FOUND_TUPLE_KEY = (
    "gAKKCmz8nEb5IGqoUBkugAJN6QMugAJ9cQAoWBAAAABwcm90b2NvbF92ZXJzaW9ucQFN6QNYDQAAAGxpdHRsZV9lbmRpYW5xAohY"
    "CgAAAHR5cGVfc2l6ZXNxA31xBChYBQAAAHNob3J0cQVLAlgDAAAAaW50cQZLBFgEAAAAbG9uZ3EHSwR1dS6AAn1xAChYBQAAAG1v"
    "ZGVscQF9cQIoWAEAAAB3cQNjdG9yY2guX3V0aWxzCl9yZWJ1aWxkX3RlbnNvcl92MgpxBCgoWAcAAABzdG9yYWdlcQVjdG9yY2gK"
    "RmxvYXRTdG9yYWdlCnEGWA4AAAA5NDA5NjI2NTc2MDUyOHEHWAMAAABjcHVxCEsGTnRxCVFLAEsDSwKGcQpLAksBhnELiWNjb2xs"
    "ZWN0aW9ucwpPcmRlcmVkRGljdApxDClScQ10cQ5ScQ9YAQAAAGJxEGgEKChoBWN0b3JjaApMb25nU3RvcmFnZQpxEVgOAAAAOTQw"
    "OTU4MTUzNjE3NjBxEmgISwROdHETUUsASwSFcRRLAYVxFYloDClScRZ0cRdScRhYAQAAAGiFhYWFhYWFhYWFhYWFhYWFhYWFhYWF"
    "hYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYVxGWgEKChoBWN0b3JjaApIYWxmU3RvcmFnZQpxGlgOAAAAOTQw"
    "OTU5NDczNTc0ODhxG2gISwJOdHEcUUsASwKFcR1LAYVxHoloDClScR90cSBScSF1WAUAAABlcG9jaHEiSwN1LoACXXEAKFgOAAAA"
    "OTQwOTU4MTUzNjE3NjBxAVgOAAAAOTQwOTU5NDczNTc0ODhxAlgOAAAAOTQwOTYyNjU3NjA1MjhxA2UuBAAAAAAAAAAAAAAAAAAA"
    "AAEAAAAAAAAAAgAAAAAAAAADAAAAAAAAAAIAAAAAAAAAADwAPAYAAAAAAAAAAu/bPoNuVr+zS6e/Liwhv7GlkD/roLg+"
)

def _read_as_the_fuzz_target_does(tmp_path: Path, name: str, found: tuple[str, ...]) -> object:
    """A found input (base64 chunks) written to a file and read as tests/fuzz/fuzz_checkpoint.py reads it."""
    from hybridvit.checkpoint import extract_state_dict, is_run_checkpoint, read_checkpoint_file, read_run

    path = tmp_path / name
    path.write_bytes(base64.b64decode("".join(found)))
    obj = read_checkpoint_file(path)
    return read_run(obj, str(path)) if is_run_checkpoint(obj) else extract_state_dict(obj, str(path))


def test_the_hollow_run_the_fuzzer_found_is_a_checkpoint_error(tmp_path):
    from hybridvit.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="holds no model name and weights"):
        _read_as_the_fuzz_target_does(tmp_path, "hollow.pt", FOUND_HOLLOW_RUN)


def test_a_tensor_under_a_key_that_is_not_a_name_is_a_checkpoint_error(tmp_path):
    from hybridvit.checkpoint import CheckpointError, make_run_checkpoint, read_run

    with pytest.raises(CheckpointError, match="not a parameter name"):
        _read_as_the_fuzz_target_does(tmp_path, "tuple_key.pt", FOUND_TUPLE_KEY)
    # the same in a run checkpoint's weights: refused by the run schema
    run = make_run_checkpoint(model_name="fastervit_nano", model_kwargs={}, num_classes=2, class_names=None,
                              pretrained_cfg={}, state_dict={("head", "weight"): torch.zeros(2, 3)})
    with pytest.raises(CheckpointError, match="state_dict missing or of the wrong type"):
        read_run(run, "crafted.pt")


def test_inputs_the_fuzzer_found_are_refused_without_allocating(tmp_path):
    import resource

    from hybridvit.checkpoint import CheckpointError, read_checkpoint_file

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i, found in enumerate(FOUND):
        path = tmp_path / f"found_{i}.pt"
        path.write_bytes(base64.b64decode(found))
        with pytest.raises(CheckpointError, match="refused"):
            read_checkpoint_file(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KB: nothing near 5.5 GB


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_seeds(corpus: Path, marker: Path) -> list[Path]:
    """Real files of every kind the reader meets, then each truncated and with bits flipped."""
    import warnings

    from hybridvit.checkpoint import make_run_checkpoint

    corpus.mkdir(parents=True, exist_ok=True)
    sd = {"w": torch.randn(3, 2), "b": torch.arange(4), "h": torch.ones(2, dtype=torch.float16)}
    seeds = {}
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, corpus / "zip.pt")
    torch.save({"model": sd, "epoch": 3}, corpus / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"x": _Payload(marker)}, corpus / "zip_payload.pt")
    torch.save({"x": _Payload(marker)}, corpus / "legacy_payload.pt", _use_new_zipfile_serialization=False)
    (corpus / "raw.pkl").write_bytes(pickle.dumps({"a": [1, 2.0, "s"], "b": (None, True)}, protocol=4))
    (corpus / "raw_payload.pkl").write_bytes(pickle.dumps(_Payload(marker), protocol=0))
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": 64}, num_classes=2,
                                   class_names=["a", "b"], pretrained_cfg={"input_size": (3, 64, 64)},
                                   state_dict=sd), corpus / "run.pt")
    try:
        from safetensors.torch import save_file
        save_file(sd, str(corpus / "weights.safetensors"))
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(corpus / "scripted.pt"))
    rng = random.Random(0)
    for path in sorted(corpus.iterdir()):
        data = path.read_bytes()
        seeds[f"{path.name}.cut"] = data[: rng.randrange(1, len(data))]
        flipped = bytearray(data)
        for _ in range(4):
            i = rng.randrange(len(flipped))
            flipped[i] ^= 1 << rng.randrange(8)
        seeds[f"{path.name}.flip"] = bytes(flipped)
    for name, data in seeds.items():
        (corpus / name).write_bytes(data)
    for i, found in enumerate(FOUND):  # inputs the fuzzer once failed on, kept as seeds
        (corpus / f"found_{i}.pkl").write_bytes(base64.b64decode(found))
    (corpus / "found_tuple_key.pt").write_bytes(base64.b64decode("".join(FOUND_TUPLE_KEY)))
    return sorted(corpus.iterdir())


def test_seed_corpus_reads_or_is_refused(tmp_path):
    """Every seed through the reader: a dict or a CheckpointError with a message, and no code runs."""
    from hybridvit.checkpoint import CheckpointError, read_checkpoint_file

    marker = tmp_path / "marker"
    seeds = write_seeds(tmp_path / "corpus", marker)
    read = 0
    for path in seeds:
        try:
            read += isinstance(read_checkpoint_file(path), dict)
        except CheckpointError as e:
            assert str(e) and str(path) in str(e)
    assert read >= 4 and not marker.exists()


@pytest.mark.slow
def test_fuzz_checkpoint_reader(tmp_path):
    pytest.importorskip("atheris", reason="the fuzzer is in the dev extra: pip install 'hybridvit[dev]'")
    seconds = int(os.environ.get("HYBRIDVIT_FUZZ_SECONDS", "60"))
    marker = tmp_path / "marker"
    corpus = tmp_path / "corpus"
    write_seeds(corpus, marker)
    env = dict(os.environ, HYBRIDVIT_FUZZ_MARKER=str(marker))
    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzz" / "fuzz_checkpoint.py"), str(corpus), f"-max_total_time={seconds}",
         "-timeout=20", "-rss_limit_mb=4096", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        capture_output=True, text=True, timeout=seconds + 300, env=env, cwd=tmp_path)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"the fuzzer found a failing input (saved under {tmp_path}):\n{tail}"
    runs = [line for line in proc.stderr.splitlines() if "stat::number_of_executed_units" in line]
    assert runs and int(runs[0].split(":")[-1]) > 100, tail
    assert not marker.exists()
