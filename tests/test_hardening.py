"""Inputs that lie, outputs that cannot be written, threads, and long audio: each case
ends in a clear error naming the problem, or in the right result, never a traceback or
lost work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

import maxwhisper
from maxwhisper.audio import AudioError
from maxwhisper.cli import main
from maxwhisper.manifest import manifest
from maxwhisper.spec import SpecError, load_spec
from maxwhisper.tokenizer import TokenizerError, WhisperTokenizer
from maxwhisper.weights import WeightsError, load_weights, save_weights
from maxwhisper.writers import output_stems

from helpers import SPEECH_DIR

MICRO = Path(__file__).parent / "data" / "specs" / "micro-2dec.yaml"


def _no_model(*_a, **_k):
    raise AssertionError("the model must not load when the call is refused up front")


def _manifest_weights(spec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (0.02 * rng.standard_normal(info.shape)).astype(np.float32)
            for name, info in manifest(spec).items()}


# Outputs

def test_output_dir_that_is_a_file_is_refused_before_decoding(tmp_path, monkeypatch, capsys):
    import maxwhisper.model

    monkeypatch.setattr(maxwhisper.model, "load_model", _no_model)
    (tmp_path / "out").write_text("x")
    assert main(["transcribe", str(SPEECH_DIR / "01.wav"), "-o", str(tmp_path / "out")]) == 2
    assert "output directory is a file" in capsys.readouterr().err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_output_dir_is_refused_before_decoding(tmp_path, monkeypatch, capsys):
    import maxwhisper.model

    monkeypatch.setattr(maxwhisper.model, "load_model", _no_model)
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o500)
    assert main(["transcribe", str(SPEECH_DIR / "01.wav"), "-o", str(tmp_path / "out")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_one_unwritable_output_loses_nothing_else(tiny_en, tmp_path, monkeypatch, capsys):
    """An output name taken by a directory, an unreadable audio and a missing one: the
    good inputs are transcribed and written, one line names each failure, exit 2."""
    import maxwhisper.model

    monkeypatch.setattr(maxwhisper.model, "load_model", lambda *a, **k: tiny_en)
    out = tmp_path / "out"
    (out / "01.txt").mkdir(parents=True)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really")
    inputs = [str(SPEECH_DIR / "01.wav"), str(tmp_path / "broken.wav"), str(tmp_path / "missing.wav"),
              str(SPEECH_DIR / "03.wav")]
    assert main(["transcribe", *inputs, "-o", str(out), "--beam-size", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("maxwhisper: error:")]
    assert len(lines) == 3
    assert any("01.txt" in line and "directory is in the way" in line for line in lines)
    assert any("broken.wav" in line for line in lines) and any("missing.wav" in line for line in lines)
    assert "Wednesday" in (out / "03.txt").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary file left behind"


def test_inputs_sharing_a_stem_get_their_own_outputs(tiny_en, tmp_path, monkeypatch):
    import maxwhisper.model

    monkeypatch.setattr(maxwhisper.model, "load_model", lambda *a, **k: tiny_en)
    for d, clip in (("d1", "01"), ("d2", "03")):
        (tmp_path / d).mkdir()
        shutil.copy(SPEECH_DIR / f"{clip}.wav", tmp_path / d / "same.wav")
    audio, rate = sf.read(SPEECH_DIR / "04.wav")
    sf.write(tmp_path / "same.flac", audio, rate)
    inputs = [str(tmp_path / "d1" / "same.wav"), str(tmp_path / "d2" / "same.wav"), str(tmp_path / "same.flac")]
    assert output_stems(inputs) == ["same.wav", "same.wav-2", "same.flac"]
    out = tmp_path / "out"
    assert main(["transcribe", *inputs, "-o", str(out), "--beam-size", "1", "--quiet"]) == 0
    texts = {p.name: p.read_text() for p in out.iterdir()}
    assert set(texts) == {"same.wav.txt", "same.wav-2.txt", "same.flac.txt"}
    assert "computers" in texts["same.wav.txt"] and "Wednesday" in texts["same.wav-2.txt"]
    assert "children" in texts["same.flac.txt"]


def test_output_stems_stay_unique_against_real_stems():
    assert output_stems(["a/x.wav", "b/x.wav", "x.wav-2.wav"]) == ["x.wav", "x.wav-2", "x.wav-2-2"]
    assert output_stems(["x.wav", "x.wav", "x-2.wav"]) == ["x.wav", "x.wav-2", "x-2"]
    assert len(set(output_stems(["a.wav", "a.wav", "a.wav", "a.wav-2.mp3", "a.wav-2.ogg"]))) == 5


def test_convert_refuses_bad_outputs(tmp_path, capsys):
    src = tmp_path / "model.pt"
    src.write_bytes(b"not a checkpoint")
    (tmp_path / "file").write_text("x")
    assert main(["convert", str(src), "--spec", "tiny.en", "--out", str(tmp_path / "file" / "w.safetensors")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["convert", str(src), "--spec", "tiny.en", "--out", str(src)]) == 2
    assert "would replace the checkpoint" in capsys.readouterr().err
    assert src.read_bytes() == b"not a checkpoint"


# The model cache

def test_cache_that_is_a_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("x")
    monkeypatch.setenv("MAXWHISPER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="MAXWHISPER_CACHE.*is a file"):
        maxwhisper.load_model("tiny.en", device="cpu")


def test_a_killed_conversion_leaves_nothing_for_long(tmp_path, monkeypatch):
    from maxwhisper.registry import ensure_converted

    monkeypatch.setenv("MAXWHISPER_CACHE", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "tiny.en" / f".converting-{dead.pid}-abc"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / "tiny.en" / f".converting-{os.getpid()}-def"
    live.mkdir()
    weights, _, _ = ensure_converted("tiny.en")
    assert weights.is_file() and not stale.exists()
    assert live.exists(), "a conversion still running elsewhere keeps its work folder"


def test_a_folder_does_not_shadow_a_model_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.en").mkdir()  # what `-o tiny.en` leaves
    model = maxwhisper.load_model("tiny.en", device="cpu")
    assert model.spec.name == "tiny.en"
    with pytest.raises(WeightsError, match="no model.safetensors"):
        maxwhisper.load_model("./tiny.en", device="cpu")


def test_a_checkpoint_of_a_custom_spec_carries_its_spec(tmp_path):
    from maxwhisper.model import _local_files

    custom = tmp_path / "my-variant.yaml"
    custom.write_text(MICRO.read_text())
    spec = load_spec(custom)
    save_weights(tmp_path / "ckpt" / "model.safetensors", _manifest_weights(spec), spec, "random")
    custom.unlink()
    _, _, found = _local_files(tmp_path / "ckpt", None)
    assert found == spec and found.dims == spec.dims


# Inputs that lie

def test_channels_first_arrays_are_refused(tiny_en):
    clip = maxwhisper.audio.load_audio(SPEECH_DIR / "01.wav")
    with pytest.raises(AudioError, match=r"channels-first.*samples\.T"):
        tiny_en.transcribe(np.stack([clip, clip]))
    stereo = tiny_en.transcribe(np.stack([clip, clip], axis=1), beam_size=None, temperature=0.0)
    assert stereo["text"] == tiny_en.transcribe(clip, temperature=0.0)["text"]


def test_samples_far_outside_the_unit_range_are_refused(tiny_en, tmp_path):
    pcm = np.round(maxwhisper.audio.load_audio(SPEECH_DIR / "01.wav") * 32767)
    with pytest.raises(AudioError, match="peak of .*divide 16-bit samples by 32768"):
        tiny_en.transcribe(pcm.astype(np.float32))
    sf.write(tmp_path / "loud.wav", pcm.astype(np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="loud.wav: samples must be in"):
        tiny_en.transcribe(str(tmp_path / "loud.wav"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_weights_holding_non_finite_values_are_refused(tmp_path, bad):
    from safetensors.numpy import save_file

    spec = load_spec(MICRO)
    weights = _manifest_weights(spec)
    weights["decoder.blocks.1.mlp.0.weight"][3, 4] = bad
    with pytest.raises(WeightsError, match=r"'decoder.blocks.1.mlp.0.weight' holds 1 NaN or infinite"):
        save_weights(tmp_path / "w.safetensors", weights, spec, "random")
    save_file(weights, str(tmp_path / "w.safetensors"))  # written by another tool
    with pytest.raises(WeightsError, match=r"w.safetensors: tensor 'decoder.blocks.1.mlp.0.weight'"):
        load_weights(tmp_path / "w.safetensors", spec)


def test_absurd_spec_sizes_are_refused_before_allocating(tmp_path):
    data = yaml.safe_load(MICRO.read_text())
    data.setdefault("decoder", {})["n_state"] = 4_000_000
    data.setdefault("encoder", {})["n_state"] = 4_000_000
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=r"parameters \(.* GiB in float32\); at most"):
        load_spec(tmp_path / "big.yaml")
    data = yaml.safe_load(MICRO.read_text())
    data["decoder"]["n_ctx"] = 1_000_000
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=r"decoder.n_ctx: attention scores of one window would take"):
        load_spec(tmp_path / "long.yaml")


def test_yaml_aliases_cannot_expand(tmp_path, capsys):
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    assert main(["spec", "check", str(tmp_path / "bomb.yaml")]) == 2
    err = capsys.readouterr().err
    assert "aliases (*name) are not accepted" in err and len(err) < 1000


def test_non_finite_spec_numbers_are_refused(tmp_path):
    data = yaml.safe_load(MICRO.read_text())
    data["norm_eps"] = float("inf")
    (tmp_path / "inf.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match="norm_eps: expected a finite number, found inf"):
        load_spec(tmp_path / "inf.yaml")


def test_an_invalid_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0" "truncation": null}')
    with pytest.raises(TokenizerError, match=r"tokenizer.json: not a valid tokenizer.json"):
        WhisperTokenizer(tmp_path / "tokenizer.json", load_spec("tiny.en"))


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--beam-size", "-1"], "--beam-size must be >= 0"),
    (["--best-of", "-2"], "--best-of must be >= 0"),
    (["--patience", "nan"], "patience needs beam_size and must be > 0"),
    (["--logprob-threshold", "inf"], "logprob_threshold must be a finite number"),
])
def test_bad_option_values_are_refused_before_loading(flags, message, monkeypatch, capsys):
    import maxwhisper.model

    monkeypatch.setattr(maxwhisper.model, "load_model", _no_model)
    assert main(["transcribe", str(SPEECH_DIR / "01.wav"), *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (dict(language="fr"), "English-only model; it cannot transcribe language 'fr'"),
    (dict(task="translate"), "English-only model; it cannot translate"),
])
def test_english_only_models_refuse_other_languages(tiny_en, overrides, message):
    with pytest.raises(TokenizerError, match=message):
        tiny_en.transcribe(str(SPEECH_DIR / "01.wav"), **overrides)


def test_ctrl_c_ends_quietly(monkeypatch, capsys):
    import maxwhisper.model

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(maxwhisper.model, "load_model", interrupted)
    assert main(["transcribe", str(SPEECH_DIR / "01.wav"), "-o", "."]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


# Threads

def test_load_and_transcribe_from_any_thread():
    """A model loaded in a worker thread; its first word-timestamp calls (which compile
    the alignment decoder) from several threads at once; every result equal to a
    single-threaded run's."""
    clips = [str(SPEECH_DIR / f"0{i}.wav") for i in (1, 2, 3)]
    loaded, errors = {}, []

    def run(target):
        try:
            target()
        except BaseException as e:  # reported below, with the thread's error
            errors.append(e)

    t = threading.Thread(target=run, args=(lambda: loaded.update(m=maxwhisper.load_model("tiny.en", device="cpu")),))
    t.start()
    t.join()
    assert not errors, errors
    model, results = loaded["m"], {}
    threads = [threading.Thread(target=run, args=(lambda c=c: results.update(
        {c: model.transcribe(c, word_timestamps=True, temperature=0.0)}),)) for c in clips]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for c in clips:
        alone = model.transcribe(c, word_timestamps=True, temperature=0.0)
        assert results[c]["text"] == alone["text"]
        assert [w["word"] for s in results[c]["segments"] for w in s["words"]] == \
            [w["word"] for s in alone["segments"] for w in s["words"]]
        assert [w["start"] for s in results[c]["segments"] for w in s["words"]] == pytest.approx(
            [w["start"] for s in alone["segments"] for w in s["words"]], abs=1e-6)


# Long audio in bounded memory

_PEAK_RSS = """
import json, resource, sys
import maxwhisper
model = maxwhisper.load_model("tiny.en", device="cpu")
result = model.transcribe(sys.argv[1], temperature=0.0, **json.loads(sys.argv[2]))
print(json.dumps(dict(rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      text=result["text"], end=result["segments"][-1]["end"] if result["segments"] else 0)))
"""


def _peak_rss(path: Path, **options) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path), json.dumps(options)], capture_output=True,
                         text=True, timeout=900,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _silence_with_speech(path: Path, seconds: int, at: list[float]) -> None:
    """PCM16 digital silence with clip 03 spoken at the given times."""
    speech, rate = sf.read(SPEECH_DIR / "03.wav", dtype="int16")
    with sf.SoundFile(path, "w", rate, 1, "PCM_16") as f:
        written = 0
        for start in at + [seconds]:
            gap = int(start * rate) - written
            for i in range(0, gap, 60 * rate):
                f.write(np.zeros(min(60 * rate, gap - i), np.int16))
            written += gap
            if start < seconds:
                f.write(speech)
                written += len(speech)


def test_two_hours_in_the_memory_of_one_minute(tmp_path):
    """Peak RSS of a whole transcription, each in its own process: two hours of audio
    (silence with speech at its start, middle and end) within 1.3x of one minute's."""
    _silence_with_speech(tmp_path / "minute.wav", 60, [10.0])
    _silence_with_speech(tmp_path / "hours.wav", 7200, [10.0, 3600.0, 7180.0])
    minute, hours = _peak_rss(tmp_path / "minute.wav"), _peak_rss(tmp_path / "hours.wav")
    assert hours["text"].count("Wednesday") == 3 and hours["end"] > 7180
    assert hours["rss_mib"] <= 1.3 * minute["rss_mib"], (minute["rss_mib"], hours["rss_mib"])


def test_an_hour_with_the_vad_in_the_memory_of_one_minute(tmp_path):
    """The VAD and batched sections read a file block by block too: an hour (silence with
    speech at its start, middle and end) within 1.3x of one minute's peak RSS."""
    _silence_with_speech(tmp_path / "minute.wav", 60, [10.0])
    _silence_with_speech(tmp_path / "hour.wav", 3600, [10.0, 1800.0, 3580.0])
    vad = dict(vad_filter=True, batch_size=8)
    minute, hour = _peak_rss(tmp_path / "minute.wav", **vad), _peak_rss(tmp_path / "hour.wav", **vad)
    assert minute["text"].count("Wednesday") == 1
    assert hour["text"].count("Wednesday") == 3 and hour["end"] > 3580
    assert hour["rss_mib"] <= 1.3 * minute["rss_mib"], (minute["rss_mib"], hour["rss_mib"])
