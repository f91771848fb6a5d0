"""WhisperX application: batched faster-whisper with VAD, wav2vec2 alignment, diarization."""
