"""The run configs under cluster/configs against the node types of the cluster files, by what the code asks Ray for.

safeconf.cluster_check reads what each stage requests from the functions that make the request (the engine
actors' remote args and placement-group bundles, Ray Train's resources_per_worker, Serve's deployment options) and
the node types of cluster/aws.yaml, cluster/gcp.yaml and cluster/kuberay/*.yaml. No Ray is started.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from safeconf import cluster_check, memory_plan
from safeconf.cluster_check import Cluster, NodeType, Request, check, check_files, kuberay_cluster, launcher_cluster
from safeconf.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CLUSTER_FILES = ["aws.yaml", "gcp.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml"]
CONFIGS = sorted(p.name for p in (CLUSTER / "configs").glob("*.yaml"))
GIB = 1024**3

# Ray Serve's own schema module warns about its pydantic usage on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text(encoding="utf-8"))


def test_every_cluster_file_is_listed():
    found = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.yaml")
             if p.parent.name != "configs" and p.name != "runtime_env.yaml"}
    assert found == set(CLUSTER_FILES), "a new cluster file: add it to CLUSTER_FILES so its node types are checked"


@pytest.mark.parametrize("cluster_file", CLUSTER_FILES)
@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_fits_the_cluster(cluster_file, config):
    cluster, fits = check_files(CLUSTER / cluster_file, CLUSTER / "configs" / config)
    problems = [p for fit in fits for p in fit.problems]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_is_checked_somewhere(config):
    """Each config has stages that some cluster file runs, so the fit test above checks something for it."""
    checked = set()
    for cluster_file in CLUSTER_FILES:
        _, fits = check_files(CLUSTER / cluster_file, CLUSTER / "configs" / config)
        checked |= {fit.request.stage for fit in fits}
    sections = cluster_check.config_sections(CLUSTER / "configs" / config)
    expected = ({"serve replicas"} if "serve" in sections else set()) | (
        {"engine actors", "train workers"} if sections & cluster_check.RUN_SECTIONS else set())
    assert expected and expected <= checked


def test_the_requests_come_from_the_code_that_makes_them():
    """The GPU run config: 8 engine actors of 1 GPU, 4 CPUs, 24 GiB; 8 train workers of 1 GPU and 8 CPUs; and the
    serve config's replicas as Serve is given them. If the code's request changes, the check follows it."""
    from safeconf.ray_utils import engine_actor_resources
    from safeconf.serving.application import deployment_options
    from safeconf.train.driver import worker_resources

    run = load_config(str(CLUSTER / "configs" / "qwen2.5-7b.yaml"))
    engines, train = cluster_check.stage_requests(run, ["engine", "train"])
    assert (engines.count, engines.bundles) == (8, [{"CPU": 4.0, "GPU": 1.0, "memory": 24.0 * GIB}])
    assert engine_actor_resources(run.engine) == {"num_cpus": 4.0, "num_gpus": 1.0, "memory": 24 * GIB}
    assert (train.count, train.bundles) == (8, [{"CPU": 8.0, "GPU": 1.0}]) and worker_resources(run.train) == {
        "CPU": 8.0, "GPU": 1}
    served = load_config(str(CLUSTER / "configs" / "qwen2.5-7b-serve.yaml"))
    [replicas] = cluster_check.stage_requests(served, ["serve"])
    actor = deployment_options(served)["ray_actor_options"]
    assert replicas.count == served.serve.max_replicas
    assert replicas.bundles == [{"CPU": actor["num_cpus"], "GPU": actor["num_gpus"], "memory": actor["memory"]}]


def test_tensor_parallel_engine_is_checked_as_its_placement_group():
    config = load_config(str(CLUSTER / "configs" / "qwen2.5-7b.yaml"),
                         ["engine.tensor_parallel_size=4", "engine.concurrency=2"])
    [engines] = cluster_check.stage_requests(config, ["engine"])
    assert engines.bundles == [{"CPU": 4.0, "memory": 24.0 * GIB}] + [{"GPU": 1.0}] * 4
    [fit] = check(cluster_check.load_cluster(CLUSTER / "aws.yaml"), [engines])
    assert fit.per_node == {"gpu_8x": 2} and fit.capacity == 4 and not fit.problems


# --- misfits are reported, naming the stage and the resource ---


def test_a_gpu_stage_on_a_cluster_without_gpus_fails_naming_stage_and_resource():
    doc = copy.deepcopy(_yaml("aws.yaml"))
    for name in [n for n, t in doc["available_node_types"].items() if t["resources"].get("GPU")]:
        del doc["available_node_types"][name]
    cluster = launcher_cluster(doc, "aws-without-gpus.yaml")
    config = load_config(str(CLUSTER / "configs" / "qwen2.5-7b.yaml"))
    fits = check(cluster, cluster_check.stage_requests(config, ["engine", "train"]))
    problems = {fit.request.stage: fit.problems for fit in fits}
    for stage in ("engine actors", "train workers"):
        [problem] = problems[stage]
        assert f"stage '{stage}'" in problem and "GPU 1 (the most any node type has: 0)" in problem, problem
    report = cluster_check.report(cluster, "qwen2.5-7b.yaml", fits)
    assert report.count("MISFIT") == 2


def test_a_placement_group_larger_than_any_node_fails():
    """16 GPU bundles in one PACK group: each bundle fits a GPU node, the group fits none."""
    config = load_config(str(CLUSTER / "configs" / "qwen2.5-7b.yaml"), ["engine.tensor_parallel_size=16"])
    [fit] = check(cluster_check.load_cluster(CLUSTER / "gcp.yaml"), cluster_check.stage_requests(config, ["engine"]))
    [problem] = fit.problems
    assert "stage 'engine actors'" in problem and "as one placement group" in problem
    assert "GPU 16 (the most any node type has: 8)" in problem and "tensor_parallel_size" in problem


def test_more_requests_at_once_than_the_cluster_scales_to_fails():
    config = load_config(str(CLUSTER / "configs" / "qwen2.5-7b.yaml"), ["train.num_workers=9"])
    [fit] = check(cluster_check.load_cluster(CLUSTER / "kuberay" / "rayjob.yaml"),
                  cluster_check.stage_requests(config, ["train"]))
    [problem] = fit.problems
    assert "stage 'train workers'" in problem and "asks for 9 at once" in problem and "at most 8" in problem


def test_memory_is_checked_where_declared_and_the_launcher_cap_counts():
    request = Request("engine actors", [{"CPU": 4.0, "GPU": 1.0, "memory": 48.0 * GIB}], 3, "engine.memory_gib")
    declared = Cluster("c", "launcher", [NodeType("g", {"CPU": 16, "GPU": 1, "memory": 42.0 * GIB}, 8)])
    [fit] = check(declared, [request])
    assert "memory 48.0 GiB (the most any node type has: 42.0 GiB)" in fit.problems[0]
    undeclared = Cluster("c", "launcher", [NodeType("g", {"CPU": 16, "GPU": 1}, 8)], max_workers=2)
    [fit] = check(undeclared, [request])
    assert fit.per_node == {"g": 1} and fit.capacity == 2 and "at most 2" in fit.problems[0]


def test_kuberay_custom_resources_and_ray_start_params():
    doc = copy.deepcopy(_yaml("kuberay/rayjob.yaml"))
    gpu = next(g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    gpu["rayStartParams"] = {"num-cpus": "10", "resources": '"{\\"node_a\\": 2}"'}
    cluster = kuberay_cluster(doc)
    types = {n.name: n for n in cluster.node_types}
    assert types["gpu"].resources == {"CPU": 10.0, "GPU": 1.0, "memory": 56.0 * GIB, "node_a": 2.0}
    assert types["head"].resources["CPU"] == 0.0  # num-cpus "0": nothing scheduled on the head
    wants = Request("train workers", [{"CPU": 1.0, "node_a": 1.0}], 20, "x")
    [fit] = check(cluster, [wants])
    assert fit.per_node == {"gpu": 2} and fit.capacity == 16 and "asks for 20 at once" in fit.problems[0]
    [fit] = check(cluster, [Request("serve replicas", [{"CPU": 1.0, "node_b": 1.0}], 1, "x")])
    assert "node_b 1 (the most any node type has: 0)" in fit.problems[0]


def test_cli_prints_the_fit_and_exits_nonzero_on_a_misfit(tmp_path, capsys):
    assert cluster_check.main([str(CLUSTER / "aws.yaml"), str(CLUSTER / "configs" / "qwen2.5-7b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "engine actors: 8 x {CPU: 4, GPU: 1, memory: 24.0 GiB} -> fits gpu_1x: 1 per node x 8" in out
    bad = tmp_path / "cpu-cluster-gpu-train.yaml"
    bad.write_text(yaml.safe_dump({"train": {"use_gpu": True, "num_workers": 2}}))
    cpu_only = tmp_path / "cpu-only.yaml"
    doc = _yaml("aws.yaml")
    doc["available_node_types"] = {k: v for k, v in doc["available_node_types"].items() if not v["resources"].get("GPU")}
    cpu_only.write_text(yaml.safe_dump(doc))
    assert cluster_check.main([str(cpu_only), str(bad)]) == 1
    assert "MISFIT stage 'train workers'" in capsys.readouterr().out
    assert cluster_check.main([str(tmp_path / "missing.yaml"), str(bad)]) == 2


def test_module_runs_as_a_script():
    run = subprocess.run([sys.executable, "-m", "safeconf.cluster_check", "cluster/kuberay/rayservice.yaml",
                          "cluster/configs/qwen2.5-7b-serve.yaml"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "serve replicas: 4 x" in run.stdout and "OK" in run.stdout



def test_the_serve_configs_commented_adapters_fit_the_rayservice_gpu_pods(tmp_path, capsys):
    """The multi-adapter example that qwen2.5-7b-serve.yaml carries (commented out) fits rayservice.yaml's one-GPU
    pods (an 80 GiB GPU each) as LoRA slots: uncommented, cluster_check passes it and counts the slots."""
    text = (REPO / "cluster/configs/qwen2.5-7b-serve.yaml").read_text()
    example = [line for line in text.splitlines() if line.startswith("  # ") and (
        "max_models_per_replica:" in line or "adapters:" in line or line.startswith("  #   - {name:"))]
    assert len(example) == 3, example
    for line in example:
        text = text.replace(line, "  " + line[4:])
    config = tmp_path / "serve-adapters.yaml"
    config.write_text(text)
    assert len(load_config(str(config)).serve.adapters) == 1
    assert cluster_check.main(["cluster/kuberay/rayservice.yaml", str(config), "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "LoRA slots (3 x rank 16)" in out and "OK" in out

# --- the GPU memory plan (safeconf.memory_plan) ---


def test_model_shapes_give_the_published_parameter_counts():
    """The shapes behind the plan reproduce each model card's parameter count (7.62B and 8.03B)."""
    assert memory_plan.KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"].params == pytest.approx(7.62e9, rel=0.01)
    assert memory_plan.KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"].params == pytest.approx(8.03e9, rel=0.01)


def test_a_local_model_folder_gives_its_shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({  # SmolLM2-135M's config.json
        "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}))
    assert memory_plan.model_shape(str(tmp_path)).params == pytest.approx(134.5e6, rel=0.01)
    assert memory_plan.model_shape("someone/unknown-model") is None


@pytest.mark.parametrize("cluster_file", ["aws.yaml", "gcp.yaml"])
@pytest.mark.parametrize("config", ["qwen2.5-7b.yaml", "llama3-8b.yaml"])
def test_shipped_gpu_configs_print_a_memory_plan_per_gpu_node_type(cluster_file, config):
    _, fits = check_files(CLUSTER / cluster_file, CLUSTER / "configs" / config)
    for fit in fits:
        assert {line.split(" ")[0] for line in fit.memory} == {"gpu_1x", "gpu_8x"}, fit.memory
        assert all("GiB usable" in line and "TOO BIG" not in line for line in fit.memory)


def test_training_without_gradient_checkpointing_does_not_fit_a_24gb_gpu(tmp_path):
    """The issue's estimate: micro-batch 4 x 1024 tokens of a 7B model keeps 15-35 GB of activations."""
    config = yaml.safe_load((CLUSTER / "configs" / "qwen2.5-7b.yaml").read_text())
    config["train"]["gradient_checkpointing"] = False
    path = tmp_path / "no-checkpointing.yaml"
    path.write_text(yaml.safe_dump(config))
    _, fits = check_files(CLUSTER / "gcp.yaml", path)
    train = next(f for f in fits if f.request.stage == "train workers")
    [on_l4] = [p for p in train.problems if "gpu_1x" in p]
    assert "L4 22.5 GiB" in on_l4 and "train.gradient_checkpointing: true" in on_l4
    plan = memory_plan.train_plan(load_config(str(path)), memory_plan.KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"], 22.5)
    activations = plan.terms["activations"] / GIB
    assert 15 < activations < 35
    checkpointed = memory_plan.activation_bytes(memory_plan.KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"], 4096, 2, True)
    assert checkpointed / GIB < activations / 5


def test_an_engine_whose_weights_do_not_fit_names_tensor_parallelism(tmp_path):
    config = yaml.safe_load((CLUSTER / "configs" / "llama3-8b.yaml").read_text())
    config["model"]["dtype"] = "float32"  # 32 GB of weights on one 24 GB GPU
    path = tmp_path / "fp32-engine.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cluster_check.main([str(CLUSTER / "aws.yaml"), str(path)]) == 1
    _, fits = check_files(CLUSTER / "aws.yaml", path)
    engines = next(f for f in fits if f.request.stage == "engine actors")
    assert any("engine.tensor_parallel_size" in p and "A10G" in p for p in engines.problems)
    config["engine"].update(tensor_parallel_size=2, num_gpus=0.0)  # split over two GPUs of the 8-GPU node
    path.write_text(yaml.safe_dump(config))
    _, fits = check_files(CLUSTER / "aws.yaml", path)
    engines = next(f for f in fits if f.request.stage == "engine actors")
    # the placement group (two GPU bundles) fits only the 8-GPU node, where each GPU holds half the weights
    assert not engines.problems and [line.split(" ")[0] for line in engines.memory] == ["gpu_8x"]
    assert "weights 15.0" in engines.memory[0]


def test_kuberay_gpu_model_from_the_node_selector_or_a_ray_resource():
    doc = copy.deepcopy(_yaml("kuberay/rayjob.yaml"))
    gpu = next(g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert kuberay_cluster(doc).node_types[-1].accelerator == ""  # the shipped manifest leaves the GPU open
    gpu["template"]["spec"]["nodeSelector"] = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert {n.name: n.accelerator for n in kuberay_cluster(doc).node_types}["gpu"] == "L4"
    gpu["template"]["spec"]["nodeSelector"] = {}
    gpu["rayStartParams"] = {"resources": '"{\\"accelerator_type:H100\\": 1}"'}
    assert {n.name: n.accelerator for n in kuberay_cluster(doc).node_types}["gpu"] == "H100"


def test_cli_gpu_memory_option_plans_an_unnamed_gpu(capsys):
    args = [str(CLUSTER / "kuberay/rayjob.yaml"), str(CLUSTER / "configs" / "qwen2.5-7b.yaml")]
    assert cluster_check.main(args) == 0
    assert "GPU memory unknown" in capsys.readouterr().out
    assert cluster_check.main(args + ["--gpu-memory-gib", "16"]) == 1  # a 16 GB GPU cannot hold 14 GiB + KV
    out = capsys.readouterr().out
    assert "TOO BIG" in out and "MISFIT stage 'engine actors' needs" in out


def test_an_autoscaling_engine_pool_needs_its_fewest_to_fit_and_says_where_it_stops(tmp_path):
    config = yaml.safe_load((CLUSTER / "configs" / "qwen2.5-7b.yaml").read_text())
    config["engine"]["concurrency"] = "2-40"  # the cluster holds 24 one-GPU engines at most
    path = tmp_path / "elastic.yaml"
    path.write_text(yaml.safe_dump(config))
    _, fits = check_files(CLUSTER / "aws.yaml", path)
    engines = next(f for f in fits if f.request.stage == "engine actors")
    assert (engines.request.least, engines.request.count) == (2, 40)
    assert not engines.problems and engines.notes == ["the autoscaling pool grows to at most 24 of its 40 actors "
                                                      "on this cluster"]
    config["engine"]["concurrency"] = "30-40"
    path.write_text(yaml.safe_dump(config))
    _, fits = check_files(CLUSTER / "aws.yaml", path)
    engines = next(f for f in fits if f.request.stage == "engine actors")
    assert "asks for 30 at once" in engines.problems[0]


def test_serve_plan_sizes_adapters_as_lora_slots_on_the_async_engine_and_as_whole_engines_otherwise():
    """A replica serving serve.adapters: on vLLM's async engine each adapter (and the model's own) is a LoRA slot of a
    few hundred MB over one 7B base; as merged copies on vLLM each is a whole engine claiming its share of the GPU,
    which cannot fit beside the first, and the plan says so with the setting that fixes it."""
    path = "cluster/configs/qwen2.5-7b-serve.yaml"
    adapters = "serve.adapters=[{name: a, adapter: /models/a}, {name: b, adapter: /models/b}]"
    plan = memory_plan.stage_plan(load_config(path, [adapters]), "serve replicas", 80)
    (slots,) = [value for name, value in plan.terms.items() if name.startswith("LoRA slots (3 x rank 16)")]
    assert 0.05 * GIB < slots < 1 * GIB and plan.fits
    merged = memory_plan.stage_plan(load_config(path, [adapters, "serve.replica_engine=batched"]), "serve replicas", 80)
    assert merged.terms["merged adapter copies (2 vLLM engines)"] == pytest.approx(2 * 0.9 * 80 * GIB)
    assert not merged.fits and merged.fix.startswith("serve.replica_engine=auto")
    alone = memory_plan.stage_plan(load_config(path), "serve replicas", 80)
    assert not any("adapter" in name for name in alone.terms)
