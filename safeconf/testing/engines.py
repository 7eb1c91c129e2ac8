"""An Engine without a model, for tests and benchmarks: a subclass answers at the public level (generate,
option_logprobs or label_scores) from a script or a hash. It is still an Engine, so the code under test treats it as
it treats the real ones (prompt_fits: everything fits, as no context limit is known)."""

from __future__ import annotations

from safeconf.engines.base import Engine


class ScriptedEngine(Engine):
    def _generate(self, prompts, n, temperature, top_p, max_tokens, stop):
        raise NotImplementedError(f"{type(self).__name__} answers generate itself, or does not generate")

    def _next_token_logprobs(self, contexts, targets):
        raise NotImplementedError(f"{type(self).__name__} answers option_logprobs / label_scores itself")
