"""last_word_accuracy: LAMBADA-style exact match of a predicted last word, as an `evaluate` metric module.

Predictions and references are token id sequences: the model's greedy tokens for the last word and the
tokens of the true last word. A prediction counts only if every token matches (so a model that gets the
first piece of a multi-token word right still scores 0 on it, as in GPT-2's LAMBADA evaluation).

    import evaluate
    metric = evaluate.load("nanogpt_hf/metrics/last_word_accuracy")   # a local folder: works offline
    metric.compute(predictions=[[262, 3290], [11]], references=[[262, 3290], [13]])  # {"accuracy": 0.5, ...}
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of examples whose predicted last-word token sequence equals the reference exactly."
_INPUTS = """
Args:
    predictions (list of list of int): predicted token ids of the last word, one list per example.
    references (list of list of int): token ids of the true last word, one list per example.
Returns:
    accuracy: correct / total; correct; total.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class LastWordAccuracy(evaluate.Metric):

    def _info(self):
        ids = datasets.Sequence(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": ids, "references": ids}),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("last_word_accuracy: no examples")
        correct = sum(list(p) == list(r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references), "correct": correct, "total": len(references)}
