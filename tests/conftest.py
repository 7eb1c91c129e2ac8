import os
from pathlib import Path

import pytest

from safeconf.engines import Completion
from safeconf.testing.engines import ScriptedEngine

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SAFECONF_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or a skip naming what is missing (a fresh clone has no ../shared)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not present: {path} (set SAFECONF_SHARED_DATA to the data folder)")
    return path


@pytest.fixture(scope="session")
def local_ray(tmp_path_factory):
    """A private local Ray for the session: its own temp dir, fresh ports (Ray picks free ones for a new local
    instance), never attached to another Ray on the machine."""
    import ray

    temp_dir = tmp_path_factory.mktemp("ray")
    ray.init(
        address="local",
        num_cpus=4,  # engine actors (1 CPU each) and Ray Data tasks must fit together on 2 real cores
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        object_store_memory=512 * 1024**2,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


S3_BUCKET = "safeconf-test"


@pytest.fixture(scope="session")
def local_s3(tmp_path_factory):
    """s3://safeconf-test on a local S3 (safeconf.testing.local_s3); yields the bucket URI. The AWS_* variables it
    sets point pyarrow (and every process started from this one, e.g. a Ray head) at it."""
    from safeconf.testing.local_s3 import local_s3 as start_local_s3

    with start_local_s3(tmp_path_factory.mktemp("moto"), S3_BUCKET) as bucket:
        yield bucket


def save_random_adapter(folder, rank: int) -> str:
    """A LoRA adapter on SmolLM2 with random (non-zero) B matrices, so it really changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from safeconf.models import resolve_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(folder)
    return str(folder)


class FakeEngine(ScriptedEngine):
    """An engine for the serving tests: replies from a script ({question substring: reply text}); option log-probs
    favour the last option; `calls` records each call and its batch size."""

    def __init__(self, replies: dict):
        self.replies = replies
        self.calls = []

    def generate(self, prompts, n=1, temperature=0.7, top_p=1.0, max_tokens=32, stop=None):
        self.calls.append(("generate", len(prompts)))
        out = []
        for messages in prompts:
            text = next((r for key, r in self.replies.items() if key in messages[-1]["content"]), "")
            out.append([Completion(text=text, token_ids=[1] * 3, token_logprobs=[-0.1] * 3)] * n)
        return out

    def option_logprobs(self, prompts, prefixes, labels):
        self.calls.append(("option_logprobs", len(prompts)))
        return [[-3.0] * (len(ls) - 1) + [-0.5] for ls in labels]


@pytest.fixture
def local_multinode():
    """A head (0 CPUs) and two worker nodes on loopback, each its own `ray start` with its own temp dir, ports,
    CPUs and custom resource (node_a: 1 CPU, node_b: 2 CPUs), failure detection in ~2 s; stopped by their pids.
    Yields the safeconf.testing.local_cluster.LocalCluster; clients run with its `env` (its auth token)."""
    from safeconf.testing.local_cluster import FAST_FAILURE_DETECTION, LocalCluster

    cluster = LocalCluster({"node_a": 1, "node_b": 2}, system_config=FAST_FAILURE_DETECTION).start(timeout=120)
    try:
        yield cluster
    finally:
        cluster.stop()
