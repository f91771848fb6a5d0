"""Plain faster-whisper (CTranslate2) as a model app: the smallest complete plug-in."""
