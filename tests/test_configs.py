"""serve_config.yaml, the generated local config and cluster.yaml, checked by Ray's own schemas."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from runtime_envs.make_local_config import local_config

ROOT = Path(__file__).resolve().parents[1]
MODEL_ENVS = {"belle2": "belle2", "whisperx": "whisperx", "transcription": "ingress"}


@pytest.fixture(scope="module")
def production() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


@pytest.fixture(scope="module")
def overlay() -> dict:
    return yaml.safe_load((ROOT / "runtime_envs" / "local.yaml").read_text())


@pytest.fixture(scope="module")
def local(production, overlay) -> dict:
    return local_config(production, overlay, http_port=18000)


def _apps(config: dict) -> dict:
    return {a["name"]: a for a in config["applications"]}


def test_production_config_is_valid_serve_schema(production):
    ServeDeploySchema.model_validate(production)


def test_local_config_is_valid_serve_schema(local):
    ServeDeploySchema.model_validate(local)


def test_production_runs_each_app_in_its_own_image(production):
    apps = _apps(production)
    assert set(apps) == {"transcription", "belle2", "whisperx"}
    images = {name: app["runtime_env"]["image_uri"] for name, app in apps.items()}
    assert len(set(images.values())) == 3
    for app in apps.values():
        # image_uri cannot be combined with working_dir / pip / uv
        assert set(app["runtime_env"]) <= {"image_uri", "env_vars"}
    assert apps["transcription"]["route_prefix"] == "/"
    assert apps["belle2"]["route_prefix"] is None and apps["whisperx"]["route_prefix"] is None


def test_production_shares_one_gpu_and_bounds_queues(production):
    apps = _apps(production)
    for name in ("belle2", "whisperx"):
        (dep,) = apps[name]["deployments"]
        assert dep["ray_actor_options"]["num_gpus"] == 0.5
        assert apps[name]["args"]["gpu_memory_fraction"] == 0.5
        auto = dep["autoscaling_config"]
        assert 1 <= auto["min_replicas"] < auto["max_replicas"]
        assert auto["target_ongoing_requests"] > 0
        assert dep["max_ongoing_requests"] > 0 and dep["max_queued_requests"] > 0
    assert apps["belle2"]["args"]["model"] == "BELLE-2/Belle-whisper-large-v3-zh"
    assert apps["whisperx"]["args"]["model"] == "large-v3"
    assert apps["belle2"]["args"]["model_cache"] and apps["whisperx"]["args"]["model_cache"]


@pytest.mark.parametrize("which", ["production", "local"])
def test_model_replicas_hold_a_batchs_worth_of_requests_and_scale_before_they_are_full(which, request):
    apps = _apps(request.getfixturevalue(which))
    for name in ("belle2", "whisperx"):
        (dep,) = apps[name]["deployments"]
        args = apps[name]["args"]
        # a request beyond max_ongoing_requests waits at the handle, where its windows cannot join a batch
        assert dep["max_ongoing_requests"] >= args["batch_size"], name
        assert args.get("batch_across_requests", True) and args["batch_wait_ms"] >= 0
        auto = dep["autoscaling_config"]
        if auto["max_replicas"] > auto["min_replicas"]:
            assert auto["target_ongoing_requests"] < dep["max_ongoing_requests"], name
    ingress = apps["transcription"]
    # what the ingress admits (serve_app/admission.py) covers the model replicas' targets, or
    # autoscaling could never see enough load to act
    models = [apps[name]["deployments"][0] for name in ("belle2", "whisperx")]
    capacity = sum(d["max_ongoing_requests"] + d["max_queued_requests"] for d in models)
    target = sum(d["autoscaling_config"]["target_ongoing_requests"] for d in models)
    assert min(ingress["args"].get("max_in_flight", 48), capacity) > target


def test_local_config_uses_one_venv_per_app_and_small_models(local):
    apps = _apps(local)
    for name, env in MODEL_ENVS.items():
        runtime_env = apps[name]["runtime_env"]
        assert runtime_env["py_executable"] == str(ROOT / ".venvs" / env / "bin" / "python")
        assert runtime_env["working_dir"] == f"local://{ROOT}"
        assert "image_uri" not in runtime_env
        for dep in apps[name]["deployments"]:
            assert dep.get("ray_actor_options", {}).get("num_gpus", 0) == 0
    assert apps["belle2"]["args"]["model"] == str(ROOT / "models" / "whisper-base-hf")
    assert apps["whisperx"]["args"]["model"] == str(ROOT / "models" / "faster-whisper-base")
    assert apps["belle2"]["args"]["local_files_only"] and apps["whisperx"]["args"]["local_files_only"]
    assert local["http_options"]["port"] == 18000


def test_local_belle2_gets_the_production_malloc_settings(production, local):
    env_vars = {name: _apps(config)["belle2"]["runtime_env"]["env_vars"] for name, config in [("production", production), ("local", local)]}
    malloc = {name: {k: v for k, v in env.items() if k.startswith("MALLOC_")} for name, env in env_vars.items()}
    assert malloc["production"] and malloc["local"] == malloc["production"]
    assert local["applications"] and "HF_HUB_OFFLINE" in env_vars["local"]  # shared ones kept too


def test_local_overlay_rejects_an_unknown_app(production, overlay):
    bad = copy.deepcopy(overlay)
    bad["applications"]["belle3"] = {"env": "belle2"}
    with pytest.raises(ValueError, match="belle3"):
        local_config(production, bad)


def test_an_edit_changes_only_its_own_apps_config(production, overlay, tmp_path):
    """`make serve` after an edit must roll the edited app (Serve restarts only on a config change)."""
    import shutil

    for rel in ("serve_app", "deployments"):
        shutil.copytree(ROOT / rel, tmp_path / rel)

    def hashes():
        config = local_config(production, overlay, root=tmp_path, venvs=tmp_path / ".venvs")
        return {n: a["runtime_env"]["env_vars"]["KLIPNOTE_CODE_HASH"] for n, a in _apps(config).items()}

    before = hashes()
    with open(tmp_path / "deployments" / "belle2" / "text.py", "a") as f:
        f.write("\n# edited\n")
    after = hashes()
    assert after["belle2"] != before["belle2"]
    assert after["whisperx"] == before["whisperx"] and after["transcription"] == before["transcription"]
    with open(tmp_path / "deployments" / "contract.py", "a") as f:
        f.write("\n# edited\n")
    assert all(hashes()[n] != after[n] for n in after)  # the shared contract rolls every app


def _local_imports(path: Path) -> set:
    """Repository files (relative paths) that `path` imports from serve_app/ or deployments/."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:  # `from a.b import c`: a.b, or a.b.c if a module
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            if name.split(".")[0] in ("serve_app", "deployments"):
                module = ROOT / name.replace(".", "/")
                for candidate in (module.with_suffix(".py"), module / "__init__.py"):
                    if candidate.is_file():
                        found.add(str(candidate.relative_to(ROOT)))
    return found


def test_each_apps_code_list_covers_what_it_imports(overlay):
    """An app whose `code` misses a module it imports would keep running the old module after an
    edit to it (the digest would not change)."""
    for name, app in overlay["applications"].items():
        listed = app["code"]

        def covered(rel: str) -> bool:
            return any(rel == entry or rel.startswith(entry.rstrip("/") + "/") for entry in listed)

        files = {str(f.relative_to(ROOT)) for entry in listed for f in ([ROOT / entry] if entry.endswith(".py") else (ROOT / entry).rglob("*.py"))}
        pending, seen = set(files), set()
        while pending:
            rel = pending.pop()
            seen.add(rel)
            pending |= _local_imports(ROOT / rel) - seen
        assert {rel for rel in seen if not covered(rel)} == set(), name


def get_invalid_configs():
    def with_app(mutate):
        config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        mutate(_apps(config))
        return config

    return [
        # a relative working_dir is not a URI Ray accepts in a config
        with_app(lambda a: a["belle2"]["runtime_env"].update(working_dir="./deployments")),
        with_app(lambda a: a["belle2"].update(import_path="not a path")),
        # two applications on one route prefix
        with_app(lambda a: a["whisperx"].update(route_prefix="/")),
        with_app(lambda a: a["whisperx"]["deployments"][0].update(max_ongoing_requests=0)),
    ]


@pytest.mark.parametrize("config", get_invalid_configs())
def test_schema_rejects_broken_configs(config):
    with pytest.raises((ValidationError, ValueError)):
        ServeDeploySchema.model_validate(config)


def test_app_args_are_valid_for_their_builders(production, local):
    """Each app's `args:` passes the pydantic model its builder validates with."""
    from deployments.belle2.app import Belle2Args
    from deployments.whisperx.app import WhisperXArgs
    from serve_app.config import IngressSettings

    for config in (production, local):
        apps = _apps(config)
        Belle2Args.model_validate(apps["belle2"]["args"])
        WhisperXArgs.model_validate(apps["whisperx"]["args"])
        IngressSettings(**apps["transcription"]["args"])


@pytest.mark.parametrize(
    "model,args,match",
    [
        ("belle2", {"device": "tpu"}, "device"),
        ("belle2", {"batch_size": 0}, "batch_size"),
        ("whisperx", {"gpu_memory_fraction": 1.5}, "gpu_memory_fraction"),
        ("whisperx", {"device": "gpu"}, "device"),
        ("transcription", {"fallback_model": "belle3"}, "fallback_model"),
        ("transcription", {"language_id": {"threshold": 2}}, "threshold"),
        ("transcription", {"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_invalid_app_args_name_the_bad_value(model, args, match):
    from deployments.belle2.app import Belle2Args
    from deployments.whisperx.app import WhisperXArgs
    from serve_app.config import IngressSettings

    validate = {
        "belle2": Belle2Args.model_validate,
        "whisperx": WhisperXArgs.model_validate,
        "transcription": lambda a: IngressSettings(**a),
    }[model]
    with pytest.raises(ValidationError, match=match):
        validate(args)


def _validated_cluster_config(config: dict) -> dict:
    # What `ray up` does before anything else: fill in the provider's defaults, then check
    # the result against Ray's cluster schema.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(config)
    validate_config(config)
    return config


def test_cluster_yaml_passes_ray_cluster_validation():
    config = _validated_cluster_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] >= t["min_workers"] >= 0 for t in gpu_types)


def test_cluster_yaml_validation_rejects_a_broken_config():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"][config["head_node_type"]]["max_workers"] = "many"
    with pytest.raises(Exception, match="many"):
        _validated_cluster_config(config)


def _locked(env: str) -> dict:
    pins = {}
    for line in (ROOT / "runtime_envs" / env / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("#")[0].strip().split("==")
            pins[name.lower()] = version
    return pins


def test_every_env_locks_the_same_ray_and_incompatible_stacks_stay_apart():
    locks = {env: _locked(env) for env in ("ingress", "belle2", "whisperx")}
    assert {lock["ray"] for lock in locks.values()} == {"2.60.0"}
    assert locks["whisperx"]["whisperx"] == "3.8.6" and locks["whisperx"]["torch"].startswith("2.8.")
    assert locks["belle2"]["transformers"].startswith("5.")
    assert "torch" not in locks["ingress"]
    # the reason for separate envs: huggingface-hub <1.0 for whisperx, >=1.3 for transformers 5
    assert int(locks["whisperx"]["huggingface-hub"].split(".")[0]) < 1
    assert tuple(map(int, locks["belle2"]["huggingface-hub"].split(".")[:2])) >= (1, 3)


@pytest.mark.parametrize("env", ["ingress", "belle2", "whisperx"])
def test_dockerfile_installs_its_lock_on_the_clusters_ray_image(env):
    text = (ROOT / "runtime_envs" / env / "Dockerfile").read_text()
    ray_version = _locked(env)["ray"]
    base = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG BASE_IMAGE="))
    assert base.startswith(f"rayproject/ray:{ray_version}-py311")
    assert f"COPY runtime_envs/{env}/requirements.lock" in text
    assert "--no-deps" in text and "-r /tmp/requirements.lock" in text
    image = next(a["runtime_env"]["image_uri"] for a in yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
                 if a["name"] == {"ingress": "transcription"}.get(env, env))
    assert f"serve-{env}:" in image and f"ray{ray_version}" in image
