"""Data: record types, loaders (JSONL/JSON/CSV/Parquet/HF datasets), tokenization with loss masks,
collators and packing.

    records = load_records("prefs.jsonl", "pairwise").records
    examples = [tokenize_pair(r, tokenizer, max_length=512, max_prompt_length=256) for r in records]
    batch = collate_pairs(examples, pad_token_id=tokenizer.pad_token_id, stack=True)

Mask polarity everywhere: True/1 = a real token that counts.
"""

from rlhflab.data.collate import (
    collate_pairs,
    collate_prompts,
    collate_ranked,
    collate_sft,
    collate_unpaired,
    make_collator,
    pad,
)
from rlhflab.data.loaders import FIELDS, KINDS, LoadResult, load_records
from rlhflab.data.packing import block_causal_mask, collate_packed, collate_shared_prompt, pack_sequences
from rlhflab.data.readers import open_source, read_rows, write_jsonl
from rlhflab.data.records import (
    LLAMA2_RATINGS,
    Conversation,
    Message,
    PairwiseRecord,
    PromptRecord,
    RankedRecord,
    Record,
    RecordError,
    SFTRecord,
    StepwiseRecord,
    Text,
    UnpairedRecord,
    margin_for_rating,
    normalize_rating,
    record_to_dict,
)
from rlhflab.data.tokenize import (
    check_lengths,
    encode_prompt,
    encode_response,
    encode_steps,
    render_chat,
    tokenize_pair,
    tokenize_prompt,
    tokenize_ranked,
    tokenize_record,
    tokenize_sft,
    tokenize_stepwise,
    tokenize_unpaired,
)

__all__ = [
    "FIELDS",
    "KINDS",
    "LLAMA2_RATINGS",
    "Conversation",
    "LoadResult",
    "Message",
    "PairwiseRecord",
    "PromptRecord",
    "RankedRecord",
    "Record",
    "RecordError",
    "SFTRecord",
    "StepwiseRecord",
    "Text",
    "UnpairedRecord",
    "block_causal_mask",
    "check_lengths",
    "collate_packed",
    "collate_pairs",
    "collate_prompts",
    "collate_ranked",
    "collate_shared_prompt",
    "collate_sft",
    "collate_unpaired",
    "encode_prompt",
    "encode_response",
    "encode_steps",
    "load_records",
    "make_collator",
    "margin_for_rating",
    "normalize_rating",
    "open_source",
    "pack_sequences",
    "pad",
    "read_rows",
    "record_to_dict",
    "render_chat",
    "tokenize_pair",
    "tokenize_prompt",
    "tokenize_ranked",
    "tokenize_record",
    "tokenize_sft",
    "tokenize_stepwise",
    "tokenize_unpaired",
    "write_jsonl",
]
