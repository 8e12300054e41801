"""Options are frozen values: refused by name when unknown or out of range, never
changed behind a caller's back; the CLI's defaults are the API's."""

from __future__ import annotations

import dataclasses

import pytest
from max.graph import DeviceRef

from maxwhisper import TranscribeOptions
from maxwhisper.builder import GraphOptions
from maxwhisper.cli import CLI_SEARCH, build_parser
from maxwhisper.decoding import DecodingOptions


def test_transcribe_options_are_frozen_and_refuse_unknown_names():
    o = TranscribeOptions(beam_size=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.beam_size = 2
    assert TranscribeOptions.of(o, language="en") == TranscribeOptions(beam_size=5, language="en")
    assert o.language is None  # the original is untouched
    with pytest.raises(ValueError, match=r"unknown transcribe option\(s\) \['beam_sizee'\]"):
        TranscribeOptions.of(beam_sizee=5)


def test_decoding_and_graph_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DecodingOptions().temperature = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        GraphOptions().taps = True
    with pytest.raises(ValueError, match="attention 'fused' runs on a GPU only"):
        GraphOptions(attention="fused", device=DeviceRef.CPU())


def test_the_cli_reads_the_apis_defaults():
    args = build_parser().parse_args(["transcribe", "a.wav"])
    d = TranscribeOptions()
    for name in ("language", "task", "patience", "length_penalty", "initial_prompt", "compression_ratio_threshold",
                 "logprob_threshold", "no_speech_threshold", "condition_on_previous_text", "without_timestamps",
                 "word_timestamps", "prepend_punctuations", "append_punctuations", "hallucination_silence_threshold"):
        assert getattr(args, name) == getattr(d, name), name
    assert tuple(args.temperature) == d.temperature
    # Beams and samples: openai-whisper's command line decodes with 5, its API with one.
    assert args.beam_size == args.best_of == CLI_SEARCH == 5 and d.beam_size is d.best_of is None


def test_the_clis_notes_go_to_stderr_as_it_is_when_they_come(capsys):
    """`main` may run more than once in a process whose stderr changes in between (a
    test runner's capture): a note goes to the stderr of its moment, never to a stream
    that has since been closed."""
    import io
    import logging
    import sys

    from maxwhisper.cli import _show_progress_notes

    log = logging.getLogger("maxwhisper")
    before = sys.stderr
    sys.stderr = earlier = io.StringIO()
    try:
        _show_progress_notes()
        log.info("maxwhisper: one")
    finally:
        sys.stderr = before
    earlier.close()
    _show_progress_notes()  # a second call adds no second handler
    log.info("maxwhisper: two")
    err = capsys.readouterr().err
    assert err.count("maxwhisper: two") == 1 and "Logging error" not in err
