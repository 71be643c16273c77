"""Evaluation, one module per metric family; each metric is a pure function, each ``evaluate_*`` adds the model calls.

| module | metrics |
|---|---|
| ``common`` | answer normalisation, ``extract_answer``, evaluation JSONL files, the grouped generation runner |
| ``vqa`` | VQA accuracy per answer type |
| ``shapes`` | shapes-world accuracy per question type; objects named by detailed captions (recall, precision) |
| ``pope`` | POPE existence questions: precision, recall, F1, yes-ratio |
| ``captions`` | BLEU-4 and CIDEr |
| ``encoder`` | stage-0 zero-shot accuracy and retrieval recall |
| ``command`` | the ``vlm-chat eval`` subcommand (sets, runners, output) |

See docs/evaluation.md.
"""

from vlm_chat.eval.captions import caption_scores, evaluate_captions
from vlm_chat.eval.common import (
    caption_tokenize,
    extract_answer,
    generate_grouped,
    infer_answer_type,
    load_eval_jsonl,
    normalize_answer,
    sample_field,
)
from vlm_chat.eval.encoder import (
    encode_images,
    encode_texts,
    evaluate_encoder,
    retrieval_recall,
    zero_shot_accuracy,
    zero_shot_predictions,
)
from vlm_chat.eval.pope import evaluate_pope, parse_yes_no, pope_metrics
from vlm_chat.eval.shapes import caption_objects, evaluate_shapes, object_recall_precision, shapes_results
from vlm_chat.eval.vqa import evaluate_vqa, vqa_scores

__all__ = [
    "caption_objects",
    "caption_scores",
    "caption_tokenize",
    "encode_images",
    "encode_texts",
    "evaluate_captions",
    "evaluate_encoder",
    "evaluate_pope",
    "evaluate_shapes",
    "evaluate_vqa",
    "extract_answer",
    "generate_grouped",
    "infer_answer_type",
    "load_eval_jsonl",
    "normalize_answer",
    "object_recall_precision",
    "parse_yes_no",
    "pope_metrics",
    "retrieval_recall",
    "sample_field",
    "shapes_results",
    "vqa_scores",
    "zero_shot_accuracy",
    "zero_shot_predictions",
]
