"""The judgement itself: plain functions of an engine and a policy, shared by the deployment, the moderation route
and the benchmark.

A judge request becomes a JudgeItem (the question the model sees, and which option means unsafe); judge_batch
answers a batch with one evaluated method through the evaluation's own code (evaluation.methods.judge: the same
prompt, parsing and fallbacks), so the calibrated threshold covers the endpoint's answers. with_decision then
applies the threshold and speaks the guard-model language:
- `label`: "safe" / "unsafe", the side of the chosen option (null for a multiple-choice question whose options
  have no safe/unsafe meaning, and for an unreadable answer);
- `p_unsafe`: the probability the judgement puts on the unsafe option (evaluation.methods.unsafe_probability,
  as the evaluation scores it: the option distribution where the method has one, else the confidence when it
  chose the unsafe option and 1 - confidence when it did not, for two options);
- `tier`: the label when the threshold accepts the judgement, `uncertain` when it defers it (null without a
  safe/unsafe meaning);
- `guarantee`: the threshold's guarantee from metrics.json's selective section (error of accepted judgements
  <= alpha with probability >= 1 - delta, chosen on calibration_size questions); null when the threshold is
  not a calibrated one (serve.threshold, or a user_config change).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from safeconf.config import Config
from safeconf.data.judge import UNSAFE, infer_unsafe_option, judge_options, judge_question
from safeconf.evaluation.methods import (
    ADAPTER_METHODS,
    JUDGE_METHODS,
    SAMPLING_METHODS,
    Judgement,
    JudgeSettings,
    engine_method,
    judge,
    unsafe_probability,
)
from safeconf.evaluation.selective import min_accepted
from safeconf.mutations import detect_lang
from safeconf.prompts import DEFAULT_STYLE, labels_for
from safeconf.serving.schemas import JudgeRequest

log = logging.getLogger("ray.serve")  # the replica's log file, beside Serve's own lines

_EPS = 1e-9  # as in evaluation.selective: a confidence of 0.7 computed as 0.6999999999 clears 0.70
TIERS = ("safe", "unsafe", "uncertain")


@dataclass
class JudgeItem:
    """A validated judge request, as the model will see it."""

    kind: str  # "mcq", "text", "request" or "response"
    lang: str
    question: str
    options: list[str]
    unsafe_option: int | None = None  # the option that means unsafe; None: the options have no safe/unsafe side

    def variant(self) -> dict:
        """The question as an original variant: default labels and framing, what the model was trained on."""
        labels = labels_for(DEFAULT_STYLE, len(self.options))
        return {"lang": self.lang, "question": self.question, "options": self.options, "labels": labels, "framing": 0}


def judge_item(request: JudgeRequest) -> JudgeItem:
    if request.question is not None:
        lang = request.lang or detect_lang(request.question + "\n" + "\n".join(request.options))
        unsafe = request.unsafe_option
        if unsafe is None:  # options worded as the project words judgements (Safe / Unsafe, "harmful?" Yes / No)
            unsafe = infer_unsafe_option(request.question, list(request.options))
        return JudgeItem("mcq", lang, request.question, list(request.options), unsafe)
    lang = request.lang or detect_lang("\n".join(t for t in (request.prompt, request.text) if t))
    if request.text is None:
        return text_item(lang, "request", request.prompt)
    if request.prompt is None:
        return text_item(lang, "text", request.text)
    return text_item(lang, "response", request.text, context=request.prompt)


def text_item(lang: str | None, kind: str, content: str, context: str | None = None) -> JudgeItem:
    """A safe/unsafe judgement of content (judge_question's wording; option 1 is the unsafe side)."""
    lang = lang or detect_lang("\n".join(t for t in (context, content) if t))
    return JudgeItem(kind, lang, judge_question(lang, kind, content, context=context), judge_options(lang), UNSAFE)


def side(choice: int | None, unsafe_option: int | None) -> str | None:
    """"safe" / "unsafe": the side an option stands for; None without a safe/unsafe meaning or an answer."""
    if choice is None or unsafe_option is None:
        return None
    return "unsafe" if choice == unsafe_option else "safe"


def judge_batch(engine, items: list[JudgeItem], method: str, settings: JudgeSettings) -> list[dict]:
    """The answer of every item by one evaluated method, through the evaluation's own judging code
    (evaluation.methods.judge: the same prompt, parsing and fallbacks, one engine call per step for the batch)."""
    variants = [item.variant() for item in items]
    answers = []
    for item, variant, found in zip(items, variants, judge(engine, variants, method, settings)):
        readable = found.choice is not None
        confidence_source, answer_source = _sources(method, found)
        answers.append({
            "kind": item.kind, "lang": item.lang, "method": method,
            "status": "answered" if readable else "unreadable",
            "answer_index": found.choice, "answer_label": variant["labels"][found.choice] if readable else None,
            "answer_text": item.options[found.choice] if readable else None, "confidence": found.confidence,
            "unsafe_option": item.unsafe_option, "label": side(found.choice, item.unsafe_option),
            "p_unsafe": unsafe_probability(found.choice, found.confidence, found.probs, item.unsafe_option,
                                           len(item.options)),
            "fallback": found.fallback, "confidence_source": confidence_source, "answer_source": answer_source,
            "reply": found.text, "truncated": found.truncated,
        })
    return answers


def _sources(method: str, found: Judgement) -> tuple[str, str | None]:
    """(where the confidence came from, where the answer came from) of a judgement, for clients and metrics."""
    name = engine_method(method)
    if name == "verbalized":
        return ("missing_confidence" if found.fallback else "stated"), ("reply" if found.choice is not None else None)
    if name in ("token_prob", "token_prob_instructed"):
        return "option_probability", "option_probability"
    return "p_true", ("option_probability" if found.fallback else "reply")


def decide(confidence: float, threshold: float | None) -> str:
    """Accept when the confidence reaches the threshold; no threshold (none was safe enough) defers all."""
    return "accept" if threshold is not None and confidence >= threshold - _EPS else "defer"


def tier(label: str | None, decision: str, has_sides: bool) -> str | None:
    """The guard tier: the label of an accepted judgement, `uncertain` for a deferred one (an unreadable answer
    included); None for a question without a safe/unsafe side."""
    if not has_sides:
        return None
    return label if decision == "accept" else "uncertain"


def with_decision(answer: dict, threshold: float | None) -> dict:
    """A judge_batch answer with its decision, threshold and tier. An unreadable answer, which the evaluation
    counts wrong, is never accepted."""
    decision = "defer" if answer["answer_index"] is None else decide(answer["confidence"], threshold)
    return {**answer, "decision": decision, "threshold": threshold,
            "tier": tier(answer["label"], decision, answer["unsafe_option"] is not None)}


@dataclass
class JudgePolicy:
    """What the endpoint serves: one evaluated method, its threshold, and the settings it was evaluated with."""

    method: str  # verbalized, token_prob, p_true (base model) or safeconf (the adapter)
    threshold: float | None  # None: no threshold was safe enough; every judgement is deferred
    source: str  # where the threshold came from
    settings: JudgeSettings
    guarantee: dict | None = None  # {alpha, delta, calibration_size} of a calibrated threshold (metrics.json)

    def user_config(self) -> dict:
        """As Serve's user_config (plain JSON), which replicas receive through `reconfigure`."""
        return {"method": self.method, "threshold": self.threshold, "threshold_source": self.source,
                "judging": self.settings.to_dict(), "guarantee": self.guarantee}

    @classmethod
    def from_user_config(cls, values: dict, current: "JudgePolicy | None" = None) -> "JudgePolicy":
        """The policy a user_config sets: its keys over the current policy's. A threshold set without its source
        is an operator's choice; and a guarantee holds only for the method, threshold and settings it was
        calibrated with: an update that changes any of them without giving its guarantee carries none."""
        merged = {**(current.user_config() if current else {}), **values}
        if "threshold" in values and "threshold_source" not in values:
            merged["threshold_source"] = "user_config"
        missing = sorted(POLICY_KEYS - merged.keys())
        if missing:
            raise ValueError(f"user_config lacks {missing}: build the application with safeconf.serving.build_app")
        judging = merged["judging"]
        settings = JudgeSettings(int(judging["max_tokens"]), tuple(judging["stop"]), float(judging["missing_confidence"]),
                                 tuple(judging.get("content_free") or JudgeSettings.content_free))
        policy = cls(merged["method"], merged["threshold"], merged.get("threshold_source", "user_config"), settings,
                     merged.get("guarantee"))
        calibrated = current is not None and (current.method, current.threshold, current.settings) == (
            policy.method, policy.threshold, policy.settings)
        if "guarantee" not in values and not calibrated:
            policy.guarantee = None
        return policy


POLICY_KEYS = {"method", "threshold", "judging"}


def check_servable(method: str, has_adapter: bool) -> None:
    """The endpoint serves a method only on the model it was evaluated on: the base-model methods without an
    adapter, safeconf (verbalized on the fine-tuned adapter) with one."""
    if method in ADAPTER_METHODS:
        if not has_adapter:
            raise ValueError(f"serve method {method!r} is {engine_method(method)} on the fine-tuned adapter: set "
                             "model.adapter (or --adapter)")
        return
    if method not in JUDGE_METHODS:
        raise ValueError(f"serve.threshold_method {method!r} cannot be served: the endpoint answers with a "
                         f"per-question method, one of {list(JUDGE_METHODS) + list(ADAPTER_METHODS)}"
                         + (" (the sampling methods need k samples per question)" if method in SAMPLING_METHODS else ""))
    if has_adapter:
        raise ValueError(f"serve method {method!r} was evaluated on the base model, but model.adapter is set: serve "
                         "'safeconf' (the adapter's method), or serve without the adapter")


def resolve_policy(config: Config) -> JudgePolicy:
    """The method, threshold and judging settings to serve.

    With serve.metrics_path (metrics.json of `safeconf evaluate`): the calibrated threshold of
    serve.threshold_method (default safeconf with an adapter, else verbalized), judged with the settings the
    evaluation used (eval.missing_confidence, sampling.max_tokens and sampling.stop of metrics.json's config),
    so the endpoint's judgements are the evaluated ones. Without: serve.threshold, for serve.threshold_method
    (default safeconf with an adapter, else token_prob: the base model's option probability, since the
    verbalized confidence of an untuned model is mostly the eval.missing_confidence stand-in).
    """
    serve_cfg, has_adapter = config.serve, bool(config.model.adapter)
    if not serve_cfg.metrics_path:
        method = serve_cfg.threshold_method or ("safeconf" if has_adapter else "token_prob")
        check_servable(method, has_adapter)
        why = "serve.threshold_method" if serve_cfg.threshold_method else "default without serve.metrics_path"
        log.info("serving method %s (%s) with serve.threshold %s (not calibrated)", method, why, serve_cfg.threshold)
        return JudgePolicy(method, serve_cfg.threshold, "serve.threshold", JudgeSettings.of(config))
    from safeconf import io

    path = serve_cfg.metrics_path
    metrics = io.read_json(path)
    method = serve_cfg.threshold_method or ("safeconf" if has_adapter else "verbalized")
    check_servable(method, has_adapter)
    methods = metrics.get("methods", {}) if isinstance(metrics, dict) else {}
    if method not in methods or "selective" not in methods[method]:
        raise ValueError(f"{path}: no selective threshold for method {method!r}; it has {sorted(methods)} "
                         "(set serve.threshold_method)")
    if not isinstance(metrics.get("config"), dict):
        raise ValueError(f"{path}: no 'config' section, so how the evaluation judged (eval.missing_confidence, "
                         "sampling.max_tokens, sampling.stop) is unknown; re-run `safeconf evaluate`")
    settings = JudgeSettings.of(metrics["config"])
    own = JudgeSettings.of(config)
    if own != settings:
        log.warning("judging as the evaluation in %s did: %s (this config's %s not used)", path, settings, own)
    evaluated = {"model": config.model.name, **({"adapter": config.model.adapter} if method in ADAPTER_METHODS else {})}
    for key, served in evaluated.items():
        if metrics.get(key) is not None and not _same_location(metrics[key], served):
            log.warning("%s: evaluated %s %r, serving %r: the calibrated threshold may not hold", path, key,
                        metrics[key], served)
    selective = methods[method]["selective"]
    threshold = selective["threshold"]
    if threshold is None:
        log.warning("%s", no_threshold_reason(path, method, selective))
    return JudgePolicy(method, threshold, f"{path} ({method})", settings, guarantee(selective))


def guarantee(selective: dict) -> dict:
    """What a calibrated threshold promises, from metrics.json's selective section: the error rate of accepted
    judgements is at most alpha with probability at least 1 - delta, over calibration_size questions."""
    return {"alpha": selective["alpha"], "delta": selective["delta"],
            "calibration_size": selective["calibration_questions"]}


def _same_location(a: str, b: str) -> bool:
    """Two model / adapter names that name the same thing (a relative and an absolute local path alike)."""
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def no_threshold_reason(path: str, method: str, selective: dict) -> str:
    """Why every judgement will be deferred: the calibration set was too small, or no threshold was safe."""
    alpha, delta, calibration = selective["alpha"], selective["delta"], selective["calibration_questions"]
    needed = min_accepted(alpha, delta)
    if calibration < needed:
        why = (f"calibration set of {calibration} questions < {needed} needed to set any threshold at "
               f"alpha={alpha}, delta={delta}")
    else:
        why = (f"no threshold kept the error of accepted judgements under alpha={alpha} (delta={delta}) on "
               f"{calibration} calibration questions")
    return f"{path}: method {method} has no selective threshold ({why}): every judgement will be deferred"


def adapter_config(config: Config, entry: dict) -> Config:
    """The config an adapter of serve.adapters judges with: the main config with that adapter and its own
    calibration (its metrics_path, threshold_method and threshold where the entry gives them)."""
    from safeconf.config import config_from_dict

    values = config.to_dict()
    values["model"]["adapter"] = entry["adapter"]
    values["serve"].update({k: entry[k] for k in ("metrics_path", "threshold_method", "threshold") if k in entry})
    values["serve"]["adapters"] = []
    return config_from_dict(values)
