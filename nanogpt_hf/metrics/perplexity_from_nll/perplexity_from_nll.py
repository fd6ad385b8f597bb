"""perplexity_from_nll: perplexity from summed negative log-likelihoods, as an `evaluate` metric module.

Unlike the Hub's "perplexity" metric (which loads a model and scores strings itself), this one aggregates the
numbers a model run already produced, so it works with any model, sliding windows and several processes:

    import evaluate
    metric = evaluate.load("nanogpt_hf/metrics/perplexity_from_nll")   # a local folder: works offline
    metric.add_batch(nll=[12.3, 10.1], num_tokens=[8, 7])              # per window: sum of NLL (nats), count
    metric.compute()  # {"perplexity": exp(22.4 / 15), "loss": 22.4 / 15, "nll_sum": 22.4, "num_tokens": 15}

`num_tokens` is whatever unit the perplexity is per: pass token counts for token-level perplexity, or the
same NLL with a word count for word-level perplexity (exp(total NLL / number of words)).
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity exp(sum(nll) / sum(num_tokens)) from per-chunk sums of negative log-likelihood (nats)."
_INPUTS = """
Args:
    nll (list of float): summed negative log-likelihood (natural log) of each chunk of text.
    num_tokens (list of int): how many units (tokens, or words for word-level perplexity) each chunk has.
Returns:
    perplexity: exp(loss); loss: total nll / total units; nll_sum; num_tokens.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class PerplexityFromNll(evaluate.Metric):

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"nll": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, num_tokens):
        total_nll, total = float(sum(nll)), int(sum(num_tokens))
        if total <= 0:
            raise ValueError("perplexity_from_nll: num_tokens must add up to a positive number")
        loss = total_nll / total
        return {"perplexity": math.exp(loss), "loss": loss, "nll_sum": total_nll, "num_tokens": total}
