"""KlipNote Serve ingress: HTTP API, audio decoding, language detection, routing, formats."""
