"""Whisper speech recognition, defined as data and compiled with MAX."""

from .model import Whisper, load_model
from .transcribe import TranscribeOptions
from .vad import VadOptions
from .spec import ModelSpec, SpecError, load_spec

__all__ = ["ModelSpec", "SpecError", "TranscribeOptions", "VadOptions", "Whisper", "load_model", "load_spec"]
