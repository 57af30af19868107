"""--tuning-cache-dir (kernels/tuning_cache.py): start-up measurements kept on disk and reused
when a node starts again on the same GPU, software and shapes; measured again otherwise.

The measuring itself is replaced by a counter (a GPU's timings are what it is for; tests never
time things): what is checked is when a node measures, what it reads back, and that a bad or
interrupted entry never stands in for a measurement.
"""

from __future__ import annotations

import json

import pytest
import torch

from services.inference.adapters.pool import AdapterPool
from services.inference.engine import model_runner
from services.inference.kernels import tuning_cache
from services.inference.kernels.decode_lora_tuning import DecodeLaunch, DecodeLoraTuning, LaunchShape
from services.inference.model.loader import random_model

SHAPE = LaunchShape(4, 16, 64, (96, 32, 32))


def a_tuning() -> DecodeLoraTuning:
    return DecodeLoraTuning({SHAPE: DecodeLaunch(256, 2)}, {SHAPE: DecodeLaunch(128, 4)},
                            {SHAPE.name: {"n128_split4": 9.5, "n256_split2": 7.0, "n512_split2": "failed: why"}},
                            {SHAPE: "lora"})


def test_a_tuning_reads_back_as_it_was_written():
    tuning = a_tuning()
    back = DecodeLoraTuning.from_json(json.loads(json.dumps(tuning.to_json())), kept_in="there.json")
    assert (back.launches, back.defaults, back.report, back.beside) == \
        (tuning.launches, tuning.defaults, tuning.report, tuning.beside)
    assert back.knobs(SHAPE) == {"block_n": 256, "split_k": 2} and back.beside_mode(SHAPE) == "lora"
    assert back.summary() == tuning.summary() + "; kept in there.json"


@pytest.fixture
def measuring(monkeypatch, tiny_model_dir):
    """measure_decode_lora on the tiny model with the timing replaced by a counter."""
    calls: list[tuple] = []

    def counting(launches, dtype, device, beside_modes):
        calls.append(tuple(beside_modes))
        return a_tuning()
    monkeypatch.setattr(model_runner, "tune_decode_lora", counting)
    monkeypatch.setattr(model_runner, "_MEASURED", {})
    model, args = random_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    pool = AdapterPool(args, 8)

    def measure(cache_dir, beside_modes=("off", "lora")) -> DecodeLoraTuning:
        monkeypatch.setattr(model_runner, "_MEASURED", {})  # as a node started again
        return model_runner.measure_decode_lora(model, pool, torch.device("cpu"), 4, 16, beside_modes, cache_dir)
    return measure, calls


def test_a_node_started_again_reads_what_the_last_start_measured(measuring, tmp_path):
    measure, calls = measuring
    first = measure(tmp_path / "cache")
    entries = list((tmp_path / "cache").glob("decode_lora-*.json"))
    assert calls == [("off", "lora")] and len(entries) == 1 and first.kept_in is None
    again = measure(tmp_path / "cache")
    assert calls == [("off", "lora")]  # not measured again
    assert again.launches == first.launches and again.beside == first.beside and again.kept_in == str(entries[0])
    assert again.summary().endswith(f"kept in {entries[0]}")
    measure(tmp_path / "cache", beside_modes=())  # measured for other modes: another entry
    assert calls == [("off", "lora"), ()] and len(list((tmp_path / "cache").glob("*.json"))) == 2
    measure(None)  # no cache: measured at every start
    assert len(calls) == 3


def test_an_unreadable_or_foreign_entry_is_measured_again_and_rewritten(measuring, tmp_path):
    measure, calls = measuring
    measure(tmp_path)
    (entry,) = tmp_path.glob("decode_lora-*.json")
    entry.write_text('{"key": {"gpu": "another"')  # cut short
    measure(tmp_path)
    assert len(calls) == 2 and json.loads(entry.read_text())["value"] == a_tuning().to_json()
    stored = json.loads(entry.read_text())
    entry.write_text(json.dumps({"key": stored["key"] | {"gpu": "another"}, "value": stored["value"]}))
    measure(tmp_path)
    assert len(calls) == 3  # an entry under another key is not this one's


def test_a_changed_kernel_source_is_another_key(monkeypatch, tmp_path):
    source = tmp_path / "kernel.py"
    source.write_text("BLOCK = 128\n")
    monkeypatch.setattr(tuning_cache, "SOURCES", [source])
    before = tuning_cache.environment("cpu")
    source.write_text("BLOCK = 256\n")
    after = tuning_cache.environment("cpu")
    assert before["sources"] != after["sources"] and before["torch"] == after["torch"] == torch.__version__
    assert tuning_cache.entry_path(tmp_path, "decode_lora", before) != tuning_cache.entry_path(tmp_path, "decode_lora",
                                                                                               after)


def test_an_entry_is_written_whole_or_not_at_all(monkeypatch, tmp_path):
    path = tmp_path / "decode_lora-x.json"

    def interrupted(value, out, **options):
        out.write('{"key": ')
        raise KeyboardInterrupt  # the node stopped mid-write
    monkeypatch.setattr(tuning_cache.json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tuning_cache.store(path, {"k": 1}, {"v": 2})
    assert list(tmp_path.iterdir()) == []  # neither the entry nor a temporary file
    monkeypatch.undo()
    tuning_cache.store(path, {"k": 1}, {"v": 2})
    assert tuning_cache.load(path, {"k": 1}) == {"v": 2} and tuning_cache.load(path, {"k": 2}) is None
