"""An lm-evaluation-harness (0.4.x) model named ``mtnlg``.

    mtnlg lm-eval --model mtnlg --model_args checkpoint=runs/x --tasks lambada_local --include_path examples/eval
    lm_eval.simple_evaluate(model=MtnlgLM(checkpoint="runs/x"), tasks=[...])

``mtnlg lm-eval`` is lm-eval's own command line with this model registered first. The stock
``lm_eval`` command cannot find it: lm-eval 0.4 has no plugin discovery for models (it knows only
the models its own modules register), so ``lm_eval --model mtnlg`` is not supported.

It reads a native mtnlg checkpoint (any layout it was trained with) or an HF directory
(``hf=DIR``), and scores through the same ``Scorer`` as ``mtnlg evaluate``. Pass ``scorer=``
(and ``tokenizer=``) to evaluate a model in memory, e.g. from inside a training run.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from mtnlg.eval.loading import default_device
from mtnlg.eval.tasks import loglikelihoods, windows


@register_model("mtnlg")
class MtnlgLM(TemplateLM):
    def __init__(self, checkpoint: str | None = None, hf: str | None = None, iteration: int | None = None,
                 batch_size: int | str = 8, device: str | None = None, max_gen_toks: int = 64, scorer: Any = None,
                 eod_id: int | None = None, generator: Any = None, **_: Any):
        super().__init__()
        from mtnlg.eval.loading import open_model

        if scorer is None:  # device: the accelerator when there is one (a launched native model: its rank's)
            model = open_model(checkpoint=checkpoint, hf=hf, iteration=iteration, device=device or default_device(),
                               batch_size=int(batch_size))
            scorer, eod_id, generator = model.scorer, model.eod_id, model.generator
        self.scorer, self._eod, self.generator = scorer, eod_id, generator
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = int(batch_size)

    @property
    def eot_token_id(self) -> int:
        return self._eod

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.scorer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.generator.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        return loglikelihoods(self.scorer, pairs, self._eod, batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="rolling loglikelihood"):
            (text,) = req.args
            ids = [self._eod] + self.scorer.encode(text)
            total = 0.0
            seqs, spans = [], []
            for begin, end, first in windows(len(ids) - 1, self.max_length, self.max_length):
                seqs.append(ids[begin:end])
                spans.append((first - begin - 1, end - begin - 1))
            for (lp, _), (a, b) in zip(self.scorer.score(seqs), spans):
                total += float(lp[a:b].sum())
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.generator is None:
            raise NotImplementedError("this mtnlg model was built without a generator")
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            text = self.generator.complete(context, max_new_tokens=max_new, stop=until)
            out.append(text)
        return out
