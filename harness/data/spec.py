"""What data preparation needs to know, and nothing else: the data package's own config.

:mod:`harness.data` knows nothing of sweep files, trials or workers; the sweep side builds a
:class:`DataSpec` (``SweepConfig.data_spec()``) and hands it over. Torch-free, plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataSpec:
    """A dataset, how its rows become token sequences, and the batch sizes they must fill.

    ``source`` and ``validation`` are as a sweep file gives them: an embedded corpus, a file or
    folder (relative to the sweep file's folder) or a hub id. ``columns`` maps each field a
    format reads (text, instruction, input, output, messages) to the user's column.
    """

    source: str = "shakespeare"
    format: str = "text"  # text | instruction | chat
    columns: dict[str, str] = field(default_factory=lambda: {
        "text": "text", "instruction": "instruction", "input": "input", "output": "output", "messages": "messages"})
    template: str = "auto"  # chat: auto | chatml | mistral
    train_on_responses_only: bool = False
    split: str = "train"
    validation: str | None = None
    validation_split: str | None = None
    val_fraction: float = 0.02
    max_train_rows: int | None = None
    max_val_rows: int | None = None
    max_seq_length: int = 256
    seed: int = 0  # the validation fraction's split
    # What check_batches_fit checks, after every prepare: the largest micro-batch (rows) any trial
    # may ask for, and whether any trial may pack naively (rows cut into full sequences, so fewer of them).
    largest_batch_size: int = 1
    naive_packing: bool = False
