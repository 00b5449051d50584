"""Training: the data layer (JSONL format, chunking, training-safe sources) and the trainer.

The JSONL format is documented in ``ctx2param.training.data``. Importing this package loads no data.
"""

from .data import (
    Passage,
    TrainingDataError,
    TrainingExample,
    boolq_examples,
    chunk_text,
    coqa_examples,
    demonstration_examples,
    is_contaminated,
    load_jsonl,
    passage_pool,
    passage_to_example,
    passages_to_examples,
    save_jsonl,
    to_training_examples,
)

__all__ = [
    "Passage",
    "TrainingDataError",
    "TrainingExample",
    "boolq_examples",
    "chunk_text",
    "coqa_examples",
    "demonstration_examples",
    "is_contaminated",
    "load_jsonl",
    "passage_pool",
    "passage_to_example",
    "passages_to_examples",
    "save_jsonl",
    "to_training_examples",
]
