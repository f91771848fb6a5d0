"""A second Ray Serve app that transcribes through the ingress's DeploymentHandle API."""

from typing import Any, Dict

from ray import serve


@serve.deployment(name="HandleCaller")
class HandleCaller:
    async def __call__(self, request) -> Dict[str, Any]:
        audio = await request.body()
        handle = serve.get_app_handle("transcription")
        result = await handle.transcribe.remote(audio, model=request.query_params.get("model", "auto"))
        return {"text": result["text"], "model": result["model"], "language": result["language"]}


def build_app(args: Dict[str, Any]):
    return HandleCaller.bind()
