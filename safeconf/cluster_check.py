"""Do the resources a run config's stages ask Ray for fit the node types of a cluster file?

    python -m safeconf.cluster_check CLUSTER_FILE CONFIG [CONFIG ...]

CLUSTER_FILE: a Ray cluster-launcher config (cluster/aws.yaml, cluster/gcp.yaml: available_node_types) or a
KubeRay manifest (RayJob, RayService or RayCluster: the head and worker groups, whose Ray resources KubeRay takes
from the Ray container's limits and rayStartParams). CONFIG: a SafeConf run config (cluster/configs/*.yaml).

What each stage asks for comes from the code that asks for it, never from a copy of it here:
  engine actors  safeconf.ray_utils.engine_actor_resources + safeconf.engines.base.placement_bundles, engine.concurrency
                 of them (the pipeline's sampling and LLM mutations, and the evaluation)
  train workers  safeconf.train.driver.worker_resources, train.num_workers of them (Ray Train)
  serve replicas safeconf.serving.application.deployment_options, up to serve.max_replicas of them (Ray Serve)
Every request must fit one node type (CPU, GPU, custom resources; memory where the node type declares it), a
tensor-parallel engine's placement group on one node (vLLM's tensor parallelism stays inside a node), and as many
requests as the stage makes at once must fit the nodes the cluster may scale to. On every GPU node type a stage
may land on, its GPU memory plan (safeconf.memory_plan: weights, KV cache, activations with or without gradient
checkpointing) must fit that node type's GPU, known from its instance type, GKE accelerator label or Ray
`accelerator_type:NAME` resource (or --gpu-memory-gib). It prints what fits where and the memory plan, and exits 1
on a misfit (2 on a file it cannot read).

Which stages run where: a launcher cluster runs every stage the config has sections for (a config with a `serve`
section is an endpoint config: serve; one with data/out/train/... a run: engines and training); a RayJob runs
jobs/full.py (engines and training, for a run config); a RayService serves whatever config it is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from safeconf import memory_plan
from safeconf.config import Config, load_config

GIB = 1024**3
RUN_SECTIONS = {"data", "out", "limit", "mutation", "sampling", "sft", "train", "eval"}
# Kubernetes resource names of GPUs a KubeRay worker may ask for; KubeRay turns them into Ray's GPU resource.
K8S_GPU_SUFFIX = "/gpu"


@dataclass
class NodeType:
    name: str
    resources: dict[str, float]  # Ray resources of one node: CPU, GPU, memory (bytes) where declared, custom
    max_nodes: int  # how many of them the cluster may have at once (the head's type: 1 + its max_workers)
    head: bool = False
    accelerator: str = ""  # the GPU model (memory_plan.GPU_MEMORY_GIB), where the file says which


@dataclass
class Cluster:
    path: str
    kind: str  # "launcher", "RayJob", "RayService" or "RayCluster"
    node_types: list[NodeType]
    max_workers: int | None = None  # the launcher's cap on worker nodes of all types together


@dataclass
class Request:
    stage: str  # "engine actors", "train workers", "serve replicas"
    bundles: list[dict[str, float]]  # one unit: one bundle, or a placement group's bundles (all on one node)
    count: int  # units the stage asks for at once (an autoscaling engine pool: its most)
    keys: str  # the config keys that set it, for the message
    least: int | None = None  # an autoscaling engine pool's fewest (engine.concurrency MIN-MAX): what must fit


@dataclass
class Fit:
    request: Request
    per_node: dict[str, int] = field(default_factory=dict)  # node type -> units one node of it holds (> 0 only)
    capacity: int = 0  # units the whole cluster can hold at once
    problems: list[str] = field(default_factory=list)
    memory: list[str] = field(default_factory=list)  # the GPU memory plan per node type
    notes: list[str] = field(default_factory=list)


# --- the cluster side ---


def load_cluster(path: str | Path) -> Cluster:
    """The node types of a launcher config or a KubeRay manifest."""
    text = Path(path).read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    if "available_node_types" in doc:
        return launcher_cluster(doc, str(path))
    if doc.get("kind") in ("RayJob", "RayService", "RayCluster"):
        return kuberay_cluster(doc, str(path))
    raise ValueError(f"{path}: neither a Ray cluster-launcher config (available_node_types) nor a KubeRay "
                     "RayJob / RayService / RayCluster manifest")


def launcher_cluster(doc: dict, path: str = "<launcher>") -> Cluster:
    head = doc.get("head_node_type")
    types = []
    for name, node_type in doc["available_node_types"].items():
        resources = node_type.get("resources")
        if resources is None:
            raise ValueError(f"{path}: available_node_types.{name}.resources is missing; declare CPU and GPU (and "
                             "memory) so the autoscaler, and this check, know what the node holds")
        count = int(node_type.get("max_workers", 0)) + (1 if name == head else 0)
        node_config = node_type.get("node_config") or {}
        machine = str(node_config.get("InstanceType") or node_config.get("machineType") or "")
        types.append(NodeType(name, {k: float(v) for k, v in resources.items()}, count, head=name == head,
                              accelerator=memory_plan.accelerator_of(machine, ray_resources=resources)))
    return Cluster(path, "launcher", types, doc.get("max_workers"))


def kuberay_cluster(doc: dict, path: str = "<kuberay>") -> Cluster:
    kind = doc["kind"]
    spec = doc.get("spec") or {}
    cluster = {"RayJob": lambda: spec.get("rayClusterSpec"), "RayService": lambda: spec.get("rayClusterConfig"),
               "RayCluster": lambda: spec}[kind]()
    if not cluster:
        raise ValueError(f"{path}: {kind} without a cluster spec (rayClusterSpec / rayClusterConfig)")
    types = []
    groups = [("head", cluster["headGroupSpec"], 1)] + [
        (group.get("groupName") or f"workerGroupSpecs[{i}]", group, int(group.get("maxReplicas", 0)))
        for i, group in enumerate(cluster.get("workerGroupSpecs") or [])]
    for name, group, count in groups:
        resources = kuberay_group_resources(group, f"{path}: {'headGroupSpec' if name == 'head' else name}")
        # the GPU model: the nodeSelector's GKE accelerator or well-known instance-type label, or a Ray resource
        selector = (group.get("template") or {}).get("spec", {}).get("nodeSelector") or {}
        accelerator = memory_plan.accelerator_of(str(selector.get("node.kubernetes.io/instance-type", "")),
                                                 str(selector.get("cloud.google.com/gke-accelerator", "")), resources)
        types.append(NodeType(name, resources, count, head=name == "head", accelerator=accelerator))
    return Cluster(path, kind, types)


def kuberay_group_resources(group: dict, where: str) -> dict[str, float]:
    """Ray resources of one pod of a KubeRay group: KubeRay passes the Ray container's (the first container's)
    CPU, GPU and memory limits (requests where no limit is set) to `ray start`; rayStartParams override them."""
    containers = (group.get("template") or {}).get("spec", {}).get("containers") or []
    if not containers:
        raise ValueError(f"{where}: no containers in the pod template")
    res = containers[0].get("resources") or {}
    amounts = {**(res.get("requests") or {}), **(res.get("limits") or {})}
    resources = {"CPU": float(math.ceil(quantity(amounts["cpu"]))) if "cpu" in amounts else 0.0,
                 "GPU": float(sum(quantity(v) for k, v in amounts.items() if k.endswith(K8S_GPU_SUFFIX)))}
    if "memory" in amounts:
        resources["memory"] = quantity(amounts["memory"])
    params = group.get("rayStartParams") or {}
    for key, name in (("num-cpus", "CPU"), ("num-gpus", "GPU"), ("memory", "memory")):
        if key in params:
            resources[name] = float(params[key])
    if "resources" in params:  # a JSON object, often written with its own quotes around it: '"{\"x\": 1}"'
        text = str(params["resources"]).strip().strip("'\"").replace('\\"', '"')
        try:
            resources.update({k: float(v) for k, v in json.loads(text).items()})
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{where}: rayStartParams.resources is not a JSON object of numbers: {err}") from None
    return resources


def quantity(value) -> float:
    """A Kubernetes quantity ("14", "500m", "56Gi", "64G") as a number (bytes for memory)."""
    text = str(value).strip()
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6,
             "G": 1e9, "T": 1e12}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


# --- the config side ---


def stages_for(cluster_kind: str, sections: set[str]) -> list[str]:
    """The stages of a config (by the sections its file has) that run on a cluster of this kind."""
    serve = "serve" in sections
    run = bool(sections & RUN_SECTIONS) or not serve  # a file of defaults only is a run of defaults
    if cluster_kind == "RayService":  # it serves whatever config SAFECONF_CONFIG names
        return ["serve"]
    if cluster_kind == "RayJob":  # jobs/full.py; an endpoint config is no job
        return ["engine", "train"] if run else []
    return (["engine", "train"] if run else []) + (["serve"] if serve else [])


def _bundle(actor: dict) -> dict[str, float]:
    """Ray remote args (num_cpus, num_gpus, memory, resources) as one resource bundle."""
    bundle = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus") or 0,  # Ray's actor default: 1 CPU
              "memory": actor.get("memory") or 0, **(actor.get("resources") or {})}
    return {k: float(v) for k, v in bundle.items() if v}


def stage_requests(config: Config, stages: list[str]) -> list[Request]:
    """What each stage asks Ray for, from the functions that ask for it."""
    from safeconf.engines.base import placement_bundles

    requests = []
    engine = config.engine
    if "engine" in stages:
        from safeconf.ray_utils import engine_actor_resources

        bundles = placement_bundles(engine) or [_bundle(engine_actor_resources(engine))]
        keys = ("engine.concurrency, engine.tensor_parallel_size (placement group of one node), engine.num_cpus, "
                "engine.memory_gib" if engine.tensor_parallel_size > 1
                else "engine.concurrency, engine.num_cpus, engine.num_gpus, engine.memory_gib")
        requests.append(Request("engine actors", [{k: float(v) for k, v in b.items()} for b in bundles],
                                engine.pool[1], keys, least=engine.pool[0]))
    if "train" in stages:
        from safeconf.train.driver import worker_resources

        requests.append(Request("train workers", [_bundle_of(worker_resources(config.train))],
                                config.train.num_workers, "train.num_workers, train.cpus_per_worker, train.use_gpu"))
    if "serve" in stages:
        from safeconf.serving.application import deployment_options

        options = deployment_options(config)
        bundles = options.get("placement_group_bundles") or [_bundle(options["ray_actor_options"])]
        requests.append(Request("serve replicas", [{k: float(v) for k, v in b.items()} for b in bundles],
                                config.serve.max_replicas,
                                "serve.max_replicas, engine.num_cpus, engine.num_gpus, engine.memory_gib"))
    return requests


def _bundle_of(resources: dict) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if v}


# --- the check ---


def unit(request: Request) -> dict[str, float]:
    """All the bundles of one request together: what one node must hold for it."""
    total: dict[str, float] = {}
    for bundle in request.bundles:
        for key, amount in bundle.items():
            total[key] = total.get(key, 0.0) + amount
    return total


def per_node(node: NodeType, need: dict[str, float]) -> int:
    """How many `need` units one node holds (memory unchecked where the node type does not declare it)."""
    fits = 10**6  # a request of nothing fits any node
    for key, amount in need.items():
        if amount <= 0 or (key == "memory" and key not in node.resources):
            continue
        fits = min(fits, math.floor(node.resources.get(key, 0.0) / amount + 1e-9))
    return int(fits)


def check(cluster: Cluster, requests: list[Request]) -> list[Fit]:
    fits = []
    for request in requests:
        fit = Fit(request)
        need = unit(request)
        usable = [n for n in cluster.node_types if n.max_nodes > 0]
        for node in usable:
            count = per_node(node, need)
            if count > 0:
                fit.per_node[node.name] = count
        what = f"stage '{request.stage}' ({request.keys})"
        if not fit.per_node:
            # name the resource(s) no node type has enough of, with the best any node type offers
            short = []
            for key, amount in sorted(need.items()):
                if key == "memory" and not any("memory" in n.resources for n in usable):
                    continue
                best = max((n.resources.get(key, 0.0) for n in usable if key != "memory" or "memory" in n.resources),
                           default=0.0)
                if best < amount:
                    short.append(f"{key} {_amount(key, amount)} (the most any node type has: {_amount(key, best)})")
            if not short:  # each resource fits somewhere, but never all of them on one node type
                short.append(f"{_resources(need)} together on one node")
            group = " as one placement group" if len(request.bundles) > 1 else ""
            fit.problems.append(f"{what}: no node type of {cluster.path} holds {_resources(need)}{group}; short of "
                                + "; ".join(short))
        else:
            fit.capacity = _capacity(cluster, fit.per_node)
            least = request.least or request.count
            if least < request.count and least <= fit.capacity < request.count:
                fit.notes.append(f"the autoscaling pool grows to at most {fit.capacity} of its {request.count} "
                                 "actors on this cluster")
            elif fit.capacity < least:
                fit.problems.append(f"{what}: asks for {least} at once, but the node types of {cluster.path} "
                                    f"can hold at most {fit.capacity} ({_where(cluster, fit.per_node)})")
        fits.append(fit)
    return fits


def check_memory(cluster: Cluster, config: Config, fits: list[Fit], gpu_memory_gib: float | None = None) -> None:
    """Add each GPU stage's memory plan on every GPU node type it may land on to its Fit: a misfit where the plan
    exceeds the node type's GPU, a note where the GPU model is unknown."""
    types = {n.name: n for n in cluster.node_types}
    for fit in fits:
        if unit(fit.request).get("GPU", 0) <= 0:
            continue  # a CPU stage; a tensor-parallel engine's GPUs are in its placement group's bundles
        for name in fit.per_node:
            node = types[name]
            gib = gpu_memory_gib or memory_plan.GPU_MEMORY_GIB.get(node.accelerator)
            if not gib:
                fit.memory.append(f"{name}: GPU memory unknown (no instance type, GKE accelerator label or Ray "
                                  "accelerator_type:NAME resource names its GPU; --gpu-memory-gib sets it): no plan")
                continue
            plan = memory_plan.stage_plan(config, fit.request.stage, gib)
            if isinstance(plan, str):
                fit.memory.append(f"{name}: {plan}")
                continue
            gpu = f"{node.accelerator or 'GPU'} {gib:g} GiB"
            fit.memory.append(f"{name} ({gpu}): {plan.describe()}" + ("" if plan.fits else "  TOO BIG"))
            if not plan.fits:
                fit.problems.append(f"stage '{fit.request.stage}' needs {plan.total / GIB:.1f} GiB per GPU on {name} "
                                    f"({gpu}), over the {plan.limit / GIB:.1f} GiB it may use; change {plan.fix}")


def _capacity(cluster: Cluster, per_node_counts: dict[str, int]) -> int:
    """Units the cluster holds at once: the largest node types first, within the launcher's max_workers."""
    types = {n.name: n for n in cluster.node_types}
    workers_left = cluster.max_workers if cluster.max_workers is not None else math.inf
    total = 0
    for name, count in sorted(per_node_counts.items(), key=lambda item: -item[1]):
        node = types[name]
        workers = min(node.max_nodes - node.head, workers_left)  # the head is outside the launcher's max_workers
        workers_left -= workers
        total += count * (workers + node.head)
    return int(total)


def _amount(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / GIB:.1f} GiB"
    return f"{value:g}"


def _resources(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_amount(k, v)}" for k, v in sorted(resources.items())) + "}"


def _where(cluster: Cluster, per_node_counts: dict[str, int]) -> str:
    types = {n.name: n for n in cluster.node_types}
    return ", ".join(f"{name}: {count} per node x {types[name].max_nodes}"
                     for name, count in per_node_counts.items())


def config_sections(path: str | Path) -> set[str]:
    values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: the config file must hold a mapping of keys")
    return set(values)


def check_files(cluster_path: str | Path, config_path: str | Path,
                gpu_memory_gib: float | None = None) -> tuple[Cluster, list[Fit]]:
    """Load both files and check the config's stages that run on that cluster: resources, then GPU memory."""
    cluster = load_cluster(cluster_path)
    stages = stages_for(cluster.kind, config_sections(config_path))
    config = load_config(str(config_path))
    fits = check(cluster, stage_requests(config, stages))
    check_memory(cluster, config, fits, gpu_memory_gib)
    return cluster, fits


def report(cluster: Cluster, config_path: str, fits: list[Fit]) -> str:
    lines = [f"{config_path} on {cluster.path} ({cluster.kind}):"]
    if not fits:
        lines.append("  nothing of this config runs on this cluster")
    for fit in fits:
        req = fit.request
        group = " (one placement group)" if len(req.bundles) > 1 else ""
        count = f"{req.least}-{req.count}" if req.least and req.least < req.count else str(req.count)
        head = f"  {req.stage}: {count} x {' + '.join(_resources(b) for b in req.bundles)}{group}"
        if fit.per_node:
            head += f" -> fits {_where(cluster, fit.per_node)}; up to {fit.capacity} at once"
        lines.append(head + ("" if fit.problems else "  OK"))
        lines += [f"    GPU memory per GPU on {line}" for line in fit.memory]
        lines += [f"    note: {line}" for line in fit.notes]
        lines += [f"    MISFIT {problem}" for problem in fit.problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safeconf.cluster_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("cluster", help="a cluster-launcher config or a KubeRay manifest")
    parser.add_argument("configs", nargs="+", help="SafeConf run configs")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="GPU memory of every GPU node type, where the cluster file does not say which GPU")
    args = parser.parse_args(argv)
    ok = True
    try:
        cluster = load_cluster(args.cluster)
        lines = ["node types:"] + [f"  {n.name} (up to {n.max_nodes}): {_resources(n.resources)}"
                                   + (f" {n.accelerator}" if n.accelerator else "") for n in cluster.node_types]
        print("\n".join(lines))
        for path in args.configs:
            _, fits = check_files(args.cluster, path, args.gpu_memory_gib)
            print(report(cluster, path, fits))
            ok = ok and not any(f.problems for f in fits)
    except (OSError, ValueError, KeyError) as err:
        print(f"cluster_check: {err}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
