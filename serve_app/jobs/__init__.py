"""Transcription jobs: durable records, a runner that claims them with a lease, webhooks."""
