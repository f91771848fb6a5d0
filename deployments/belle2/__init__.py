"""BELLE-2 application: transformers Whisper decoding Mandarin, with VAD windows in batches."""
